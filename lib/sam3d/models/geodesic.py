"""Geodesic distance maps of clicks over an image (DeepIGeoS, Wang et al., TPAMI 2018), in torch, batched.

A click's geodesic distance grows by sqrt(1 + beta * (I(x) - I(y))^2) per step between face neighbours x, y: one
voxel per step in a uniform region, much more across an edge, so the map of a click already follows the image's
boundaries. The distance is relaxed by repeated minimum passes over the six face neighbours (a parallel
Bellman-Ford; each pass extends every path by one voxel), on a grid `downsample` times coarser than the window
(the map is a prompt, not a mask: 32^3 passes are cheap on a CPU), then upsampled.
"""

import torch
import torch.nn.functional as F

_FAR = 1e4  # "no click reaches here"; also the distance of a channel without clicks


def _shifted(x: torch.Tensor, dim: int, step: int, fill: float) -> torch.Tensor:
    """x moved by `step` (+1/-1) along `dim`, the vacated face filled with `fill`."""
    out = torch.roll(x, step, dims=dim)
    index = 0 if step > 0 else x.shape[dim] - 1
    out.select(dim, index).fill_(fill)
    return out


def geodesic_distance(image: torch.Tensor, seeds: torch.Tensor, beta: float, iterations: int) -> torch.Tensor:
    """(B, 1, d, h, w) image and (B, C, d, h, w) seed masks -> (B, C, d, h, w) geodesic distance in voxel steps
    from each channel's seeds (`_FAR` where none reaches within `iterations` passes)."""
    dist = torch.where(seeds > 0.5, 0.0, _FAR).to(torch.float32)
    image = image.float()
    costs = []
    for dim in (2, 3, 4):
        for step in (1, -1):
            diff = image - _shifted(image, dim, step, 0.0)
            cost = torch.sqrt(1.0 + beta * diff**2)
            cost.select(dim, 0 if step > 0 else image.shape[dim] - 1).fill_(_FAR)  # no neighbour beyond the face
            costs.append((dim, step, cost))
    for _ in range(iterations):
        best = dist
        for dim, step, cost in costs:
            best = torch.minimum(best, _shifted(dist, dim, step, _FAR) + cost)
        if torch.equal(best, dist):
            break
        dist = best
    return dist.clamp_max(_FAR)


def geodesic_click_maps(image: torch.Tensor, points, beta: float, scale: float, downsample: int = 2) -> torch.Tensor:
    """(B, 1, S, S, S) normalised window and clicks ((B, N, 3) window voxel indices, (B, N) labels 1/0/-1) ->
    (B, 2, S, S, S): exp(-D / scale) for the positive and for the negative clicks (D in window voxels), 0 where a
    channel has no click."""
    b, _, s = image.shape[:3]
    g = s // downsample
    seeds = image.new_zeros((b, 2, g, g, g), dtype=torch.float32)
    if points is not None and points[0].shape[1]:
        coords, labels = points
        cells = ((coords.float() + 0.5) / downsample - 0.5).round().long().clamp(0, g - 1)  # (B, N, 3)
        for channel, value in ((0, 1), (1, 0)):
            bi, ni = torch.nonzero(labels == value, as_tuple=True)
            c = cells[bi, ni]
            seeds[bi, channel, c[:, 0], c[:, 1], c[:, 2]] = 1.0
    if not seeds.any():
        return image.new_zeros((b, 2, s, s, s))
    coarse = F.avg_pool3d(image.float(), downsample) if downsample > 1 else image.float()
    dist = geodesic_distance(coarse, seeds, beta, iterations=3 * g)
    maps = torch.exp(-dist * downsample / scale)  # 0 where no click of that sign exists (_FAR)
    if downsample > 1:
        maps = F.interpolate(maps, size=(s, s, s), mode="trilinear", align_corners=False)
    return maps.to(image.dtype)

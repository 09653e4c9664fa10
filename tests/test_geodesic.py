"""Geodesic click maps (sam3d.models.geodesic, DeepIGeoS) and the click model that takes them (`geodesic_maps`)."""

import math

import torch

from sam3d.models import build_network
from sam3d.models.geodesic import geodesic_click_maps, geodesic_distance


def test_in_a_uniform_image_the_distance_is_the_number_of_face_steps():
    image = torch.zeros(1, 1, 9, 9, 9)
    seeds = torch.zeros(1, 1, 9, 9, 9)
    seeds[0, 0, 4, 4, 4] = 1
    d = geodesic_distance(image, seeds, beta=10.0, iterations=50)[0, 0]
    idx = torch.stack(torch.meshgrid(*[torch.arange(9)] * 3, indexing="ij"))
    assert torch.allclose(d, (idx - 4).abs().sum(0).float())


def test_crossing_an_edge_costs_its_intensity_step():
    image = torch.zeros(1, 1, 8, 4, 4)
    image[:, :, 4:] = 3.0  # two halves, an edge between slices 3 and 4
    seeds = torch.zeros(1, 1, 8, 4, 4)
    seeds[0, 0, 0, 0, 0] = 1
    d = geodesic_distance(image, seeds, beta=10.0, iterations=50)[0, 0]
    assert d[3, 0, 0] == 3 and math.isclose(float(d[4, 0, 0]), 3 + math.sqrt(1 + 10 * 9), rel_tol=1e-5)
    assert math.isclose(float(d[7, 0, 0] - d[4, 0, 0]), 3, rel_tol=1e-5)  # uniform again beyond it


def test_click_maps_follow_the_structure_a_click_is_on():
    image = torch.zeros(1, 1, 32, 32, 32)
    image[:, :, 8:24, 8:24, 8:24] = 4.0  # a bright cube
    points = (torch.tensor([[[12.0, 12.0, 12.0], [2.0, 2.0, 2.0]]]), torch.tensor([[1, 0]]))
    maps = geodesic_click_maps(image, points, beta=30.0, scale=16.0)
    pos, neg = maps[0, 0], maps[0, 1]
    # the far corner of the cube, 27 voxels away, is nearer than the voxel just outside the cube, 8 away
    assert pos[22, 22, 22] > 2 * pos[12, 12, 5]
    assert neg[4, 4, 4] > neg[12, 12, 12]  # the negative click is outside: the cube is far from it
    only_positive = geodesic_click_maps(image, (points[0][:, :1], points[1][:, :1]), beta=30.0, scale=16.0)
    assert only_positive[0, 1].abs().sum() == 0 and torch.equal(
        geodesic_click_maps(image, None, 30.0, 16.0), torch.zeros(1, 2, 32, 32, 32)
    )


def test_started_from_plain_weights_the_geodesic_model_answers_as_they_do_then_uses_the_image():
    tiny = {"img_size": 16, "filters": 8, "blocks_down": [1, 1, 1]}
    torch.manual_seed(0)
    plain = build_network("clicknet_small", **tiny).eval()
    geo = build_network("clicknet_geodesic", **tiny).eval()
    missing, unexpected = geo.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["geodesic_in.weight"] and not unexpected
    image = torch.randn(1, 1, 16, 16, 16)
    points = (torch.tensor([[[8.0, 8.0, 8.0]]]), torch.tensor([[1]]))
    prev = torch.zeros(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(
            geo.decode(image, points=points, mask_input=prev)[0], plain.decode(image, points=points, mask_input=prev)[0]
        )
        geo.geodesic_in.weight.normal_(0, 0.5)  # as training would make it matter
        a = geo.decode(image, points=points, mask_input=prev)[0]
        edged = image.clone()
        edged[..., 10:, :, :] += 5.0  # an edge near the click changes its geodesic map, and the answer
        b = geo.decode(edged, points=points, mask_input=prev)[0]
        b_plain_part = plain.decode(edged, points=points, mask_input=prev)[0]
        a_plain_part = plain.decode(image, points=points, mask_input=prev)[0]
    assert not torch.allclose(b - b_plain_part, a - a_plain_part)

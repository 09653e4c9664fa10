"""Which torch device a task runs on, as the app's `device` settings name it (infer, train and scoring tasks)."""


def resolve_device(device: str | None) -> tuple[str, str | None]:
    """(device, error): auto -> cuda when available, else cpu; an unusable device is an error for /info."""
    import torch

    device = (device or "auto").strip().lower()
    if device == "auto":
        return ("cuda" if torch.cuda.is_available() else "cpu"), None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return device, f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)"
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        return device, f"device {device!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)"
    return device, None


def gpus_for(device: str) -> str:
    """MONAI Label's `gpus` request value (CUDA_VISIBLE_DEVICES of a task process) for a device."""
    if device == "cpu":
        return "-1"  # no GPU visible: the pipeline (ignite's device()) trains on the CPU
    if device.startswith("cuda:"):
        return device.split(":", 1)[1]
    return "all"

"""What is available: every known dataset (with local presence) and every model (with size and cost)."""
from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from .data import dataset_spec, list_datasets, resolve_data_dir
from .data import medmnist as mm
from .models import create_model, list_models, model_info


def dataset_table(data_dir: str | os.PathLike | None = None) -> list[dict]:
    root = resolve_data_dir(data_dir)
    rows = []
    for name in list_datasets():
        spec = dataset_spec(name)
        if spec.kind == "medmnist":
            info = mm.task_info(name)
            from medmnist import INFO

            local = [s for s in mm.SIZES if (root / mm.file_name(name, s)).is_file()]
            if name == "breastmnist" and 28 not in local and data_dir is None:
                local.insert(0, 28)  # the embedded copy
            rows.append({"name": name, "task": info.task, "n_channels": info.n_channels,
                         "n_classes": info.num_classes, "classes": list(info.class_names),
                         "split_sizes": dict(INFO[name]["n_samples"]), "local_sizes": local,
                         "license": INFO[name].get("license", ""), "data_dir": str(root)})
        else:
            present = (root / spec.file).is_file()
            classes, n = [], None
            if present:  # read only the small arrays; unreadable or wrong keys: listed as present, train says why
                with contextlib.suppress(Exception), np.load(root / spec.file, allow_pickle=False) as z:
                    classes, n = [str(c) for c in z["classes"]], len(z["labels"])
            rows.append({"name": name, "task": "multi-class", "n_channels": 1, "n_classes": len(classes) or None,
                         "classes": classes, "split_sizes": None, "n_images": n,
                         "local_sizes": list(spec.sizes) if present else [], "license": "CC BY-SA 4.0",
                         "data_dir": str(root)})
    return rows


def count_macs(model: torch.nn.Module, img_size: int, in_chans: int) -> int | None:
    """Multiply-accumulates of one forward pass of one image (torch's FLOP counter / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, in_chans, img_size, img_size)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model.eval()(x)
        return fc.get_total_flops() // 2
    except Exception:  # a model that cannot run at this size
        return None


def model_table(img_size: int = 28, in_chans: int = 1, num_classes: int = 2) -> list[dict]:
    rows = []
    for name in list_models():
        info = model_info(name)
        model = create_model(name, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
        rows.append({"name": name, "family": info.family, "paper": info.paper, "description": info.description,
                     "params": sum(p.numel() for p in model.parameters()),
                     "macs": count_macs(model, img_size, in_chans), "img_size": img_size, "in_chans": in_chans})
    return rows

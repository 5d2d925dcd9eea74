"""The Grad-CAM methods medmix offers and its one default, shared by ``medmix explain``, :func:`medmix.explain`, the
HTTP API and the web page. Torch-free, so the command line and the server can name them without importing torch."""
from __future__ import annotations

# method name -> pytorch_grad_cam class name (eigencam is class-agnostic: first principal component of the feature map)
METHODS: dict[str, str] = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "layercam": "LayerCAM",
                           "xgradcam": "XGradCAM", "hirescam": "HiResCAM", "eigencam": "EigenCAM"}
# Plain Grad-CAM averages gradients over the map; on the token mixer those change sign across positions and the
# heatmap can come out inverted (on a task whose label depends on one image quadrant, the heatmap mass in that
# quadrant ranged 0.09-0.90 over training seeds). Grad-CAM++ weights positive gradients per position and stayed at
# 0.55-0.79 (tests/test_explain.py), so it is the default everywhere; the others remain selectable.
DEFAULT_METHOD = "gradcam++"

"""The Grad-CAM methods medmix offers and its one default, shared by ``medmix explain``, :func:`medmix.explain`, the
HTTP API and the web page. Torch-free, so the command line and the server can name them without importing torch."""
from __future__ import annotations

# method name -> pytorch_grad_cam class name (eigencam is class-agnostic: first principal component of the feature map)
METHODS: dict[str, str] = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "layercam": "LayerCAM",
                           "xgradcam": "XGradCAM", "hirescam": "HiResCAM", "eigencam": "EigenCAM"}
# The default is the most faithful method by ROAD (remove and debias; pytorch-grad-cam's ROADCombined) on the val
# splits of BreastMNIST, PneumoniaMNIST and RetinaMNIST, 3 training seeds each (benchmarks/explain.py,
# results/explain.md): Grad-CAM 0.087, XGrad-CAM 0.085, Grad-CAM++ 0.066, LayerCAM 0.021, EigenCAM 0.020, HiResCAM
# -0.005. Caveat, measured on the test suite's one-quadrant task: plain Grad-CAM averages gradients over the map,
# and on the token mixer its mass in the informative quadrant varies widely with the training seed (0.03-0.85),
# where Grad-CAM++ and LayerCAM stay at 0.6-0.8 (tests/test_explain.py checks those two).
DEFAULT_METHOD = "gradcam"

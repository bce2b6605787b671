"""agmm-deploy: sparse-label semantic segmentation (AGMM) from training to export (ONNX Runtime, OpenVINO,
AOTInductor, TensorRT: the runtime table in agmm_deploy.runtime) to prediction and BentoML serving."""

__version__ = "0.1.0"

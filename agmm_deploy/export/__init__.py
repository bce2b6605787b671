"""Export stages, one file each: onnx.py (export_onnx), precision.py (convert_precision: fp16/int8 ONNX models
for ONNX Runtime, one row per precision), tensorrt.py (build_engine, imported lazily), parity.py
(check_parity, check_artifacts, set_aside). What the artifacts carry is agmm_deploy.contract."""

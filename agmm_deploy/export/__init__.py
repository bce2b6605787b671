"""Export stages, one file each: onnx.py (export_onnx), precision.py (convert_precision: the precision table,
one row per precision and runtime), openvino.py (OpenVINO IRs), aoti.py (export_aoti: AOTInductor packages),
tensorrt.py (build_engine, imported lazily), parity.py
(check_parity, check_artifacts, set_aside). What the artifacts carry is agmm_deploy.contract."""

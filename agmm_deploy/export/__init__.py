"""Export stages, one file each: onnx.py (export_onnx), tensorrt.py (build_engine, imported lazily),
parity.py (check_parity). What the artifacts carry is agmm_deploy.contract."""

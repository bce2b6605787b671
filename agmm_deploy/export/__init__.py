"""Export stages, one file each: onnx.py (export_onnx), tensorrt.py (build_engine, imported lazily),
parity.py (check_parity), metadata.py (metadata_props and engine sidecar JSON)."""

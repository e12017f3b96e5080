"""REACT video object detection: synthetic benchmark, detector runtime, trackers, edge-cloud fusion.

Device-side (Python >= 3.8, no torch/SQLAlchemy/matplotlib): `synth` (generator), `detector` (onnxruntime
session + numpy decode/NMS), `tracking` (box trackers), `fusion` (the REACT state machine), `pipeline` (the
device loop). `evaluate` needs pycocotools and runs on the bench/cloud side only.
"""

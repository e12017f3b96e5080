"""REACT video object detection: synthetic benchmark, detector runtime, trackers, edge-cloud fusion.

Device-side (Python >= 3.8, no torch/SQLAlchemy/matplotlib): `synth` (generator), `detector` (onnxruntime
session + numpy decode/NMS), `tracking` (box trackers), `fusion` (the REACT state machine), `pipeline` (the
device loop), `sources` (clips on disk or a real video through OpenCV), `dataset` (a split's layout on disk),
`providers` (which of the onnxruntime providers asked for the host has; the cloud worker uses it too).
`evaluate` needs pycocotools and runs on the bench/cloud side only; `cli` is `edgecascade video make`.
A leaf library: its modules import no other edgecascade package (only `cli`, an entry point, reads
Fashion-MNIST through `device_agent.sources`); the agent (`device_agent.camera`) and the cloud worker
(`cloud_worker.tasks`, `cloud_worker.model`) import it, never the other way round.
"""

"""The device side of edgecascade: the edge cascade on onnxruntime, offload policies, MQTT link and outbox.

Python >= 3.8, no torch: a device installs `pip install .[device]`. One owner per concept:

    agent       DeviceAgent: wires the parts below, submit() -> Future[InferenceRecord]
    session     RunSession: one run's outbox, numbers, sink and link, shared with the camera agent
    keys        every name a device gives things: run ids, outbox keys, correlation ids, per-run state
    inference   the windowed edge pass (cascade + meter) on the agent's inference thread
    cascade     the ONNX main/extension sessions; rule: softmax, entropy, the exit decision
    policies    which samples go to the cloud (MEANet, HI, cloud-only, edge-only); hi_online
    offloads    in-flight cloud requests, deadlines and the fallback; settlement: a reply or fallback
                becomes the final record
    capacity    whether an offload can come back before its deadline (the workers' published load, the
                device's round trips, the operator's budget), else it is shed: answered at the edge
    outbox      the durable SQLite queue of records and offloads (one process each); durable: counters,
                pass progress, the runs remembered (the last 100)
    sink        RecordSink: record on disk first, then the future resolves
    link        the MQTT connection (paho-mqtt 2.x): publish, replies, reconnect with backoff
    samples     one sample on its way, the EdgeView policies see; runs: a run's opening record and summary
    sources     where samples come from (dataset pass, watched directory, array)
    energy      joules per inference from metering; card: the model card the agent reports
    camera      CameraAgent, the REACT device loop; camera_config, camera_cli
    config      AgentConfig (frozen) and profiles; cli: `edgecascade agent`

    from device_agent import AgentConfig, DeviceAgent
    config = AgentConfig(device_id="cam-01", broker=address, model_dir=Path("models/fashion-mnist"))
    with DeviceAgent(config) as agent:
        record = agent.submit(image).result()
"""

from device_agent.agent import DeviceAgent, RunSummary
from device_agent.config import AgentConfig, apply_profile, load_profile

__all__ = ["AgentConfig", "DeviceAgent", "RunSummary", "apply_profile", "load_profile"]

"""The device side of edgecascade: the edge cascade on onnxruntime, offload policies, MQTT link and outbox.

Python >= 3.8, no torch: a device installs `pip install .[device]`.

    from device_agent import AgentConfig, DeviceAgent
    config = AgentConfig(device_id="cam-01", broker=address, model_dir=Path("models/fashion-mnist"))
    with DeviceAgent(config) as agent:
        record = agent.submit(image).result()
"""

from device_agent.agent import DeviceAgent, RunSummary
from device_agent.config import AgentConfig, apply_profile, load_profile

__all__ = ["AgentConfig", "DeviceAgent", "RunSummary", "apply_profile", "load_profile"]

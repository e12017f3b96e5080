"""MQTT topic names. One place builds them so devices, workers, collector and the ACL agree."""

from __future__ import annotations

from dataclasses import dataclass

from protocol.ids import check_device_id, check_name

DEFAULT_ROOT = "edgecascade/v1"
CLOUD_GROUP = "cloud"


@dataclass(frozen=True)
class Topics:
    """Topic layout under one root.

    The root is `edgecascade/v1` in production; tests and staging put one namespace level in front of it
    (`<ns>/edgecascade/v1`), which the broker's ACL also allows, so that runs never see each other's traffic.
    """

    root: str = DEFAULT_ROOT

    @classmethod
    def namespaced(cls, namespace: str) -> Topics:
        return cls(f"{check_name(namespace, 'namespace')}/{DEFAULT_ROOT}")

    def offload(self, device_id: str) -> str:
        return f"{self.root}/{check_device_id(device_id)}/offload"

    def reply(self, device_id: str) -> str:
        return f"{self.root}/{check_device_id(device_id)}/reply"

    def frames(self, device_id: str) -> str:
        """Video frames offloaded to the cloud detectors (REACT); answered on `reply` like offloads."""
        return f"{self.root}/{check_device_id(device_id)}/frames"

    def gateway(self, device_id: str) -> str:
        """Windows a sensor sends to its site's gateway (the fault hierarchy, `cloud_worker.gateway`);
        answered on `reply` like offloads."""
        return f"{self.root}/{check_device_id(device_id)}/gateway"

    def input(self, device_id: str) -> str:
        """Images for the device to classify, from its sensors and cameras (`device_agent.mqtt_input`): only
        the device's own account and its sensor account (`protocol.ids.sensor_account`) may publish here."""
        return f"{self.root}/{check_device_id(device_id)}/input"

    def results(self, device_id: str) -> str:
        return f"{self.root}/{check_device_id(device_id)}/results"

    def receipts(self, device_id: str) -> str:
        """The collector's receipts for result batches it has committed (end-to-end acknowledgement)."""
        return f"{self.root}/{check_device_id(device_id)}/receipts"

    def status(self, device_id: str) -> str:
        return f"{self.root}/{check_device_id(device_id)}/status"

    def cloud_load(self, worker_id: str) -> str:
        """A cloud worker's retained load (`protocol.load`); `@` keeps it out of every device's topics."""
        return f"{self.root}/@cloud/{check_name(worker_id, 'worker id')}/load"

    def model_manifest(self, group: str) -> str:
        """The retained signed manifest (`protocol.bundle`) of the model version a device group serves;
        only the operator account may publish under `@models` (broker/edgecascade-roles.json)."""
        return f"{self.root}/@models/{check_name(group, 'device group')}/manifest"

    def model_history(self, group: str) -> str:
        """The operator's retained list of a group's last signed manifests (what `rollback` goes back to)."""
        return f"{self.root}/@models/{check_name(group, 'device group')}/history"

    def model_chunk(self, sha256: str, index: int) -> str:
        """Chunk `index` of the model file with this sha256 (retained; files are addressed by content)."""
        return f"{self.root}/@model-files/{check_name(sha256, 'file sha256')}/{int(index)}"

    def model_chunks(self, sha256: str) -> str:
        return f"{self.root}/@model-files/{check_name(sha256, 'file sha256')}/+"

    def operator_probe(self, token: str) -> str:
        """Where the operator echoes a message to itself: once it is back, the retained messages of every
        subscription made before it have arrived (MQTT keeps one connection's order)."""
        return f"{self.root}/@models/@probe/{check_name(token, 'probe token')}"

    @property
    def all_status(self) -> str:
        return f"{self.root}/+/status"

    @property
    def all_cloud_load(self) -> str:
        return f"{self.root}/@cloud/+/load"

    @property
    def all_offloads(self) -> str:
        return f"{self.root}/+/offload"

    @property
    def all_results(self) -> str:
        return f"{self.root}/+/results"

    def cloud_subscription(self, group: str = CLOUD_GROUP, kind: str = "offload") -> str:
        """Shared subscription: the broker hands each offload (`kind` offload) or video frame (`frames`) to
        exactly one worker of the group."""
        if kind not in ("offload", "frames", "gateway"):
            raise ValueError(f"cloud workers serve offload, frames or gateway, not {kind!r}")
        return f"$share/{check_name(group, 'group')}/{self.root}/+/{kind}"

    def device_of(self, topic: str) -> str:
        """The device id in a topic of this root (`<root>/<device>/<kind>`)."""
        prefix = self.root + "/"
        if not topic.startswith(prefix):
            raise ValueError(f"topic {topic!r} is not under {self.root!r}")
        parts = topic[len(prefix) :].split("/")
        if len(parts) != 2:
            raise ValueError(f"topic {topic!r} is not <root>/<device>/<kind>")
        return check_device_id(parts[0])

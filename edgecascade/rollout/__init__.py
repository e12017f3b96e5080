"""The operator's side of model rollouts (`edgecascade models`): keys, signed bundles, publishing over MQTT,
the canary watch and rollback. The device's side is `device_agent.rollout`; the wire format `protocol.bundle`.

- `keys`: the ed25519 signing key pair (the private half never leaves the operator's machine or enters git);
- `bundles`: a model directory -> the manifest of one version, signed;
- `operator`: the MQTT client of the `operator` account: files and manifests out, history and statuses in;
- `canary`: the verdict on a canary group's agreement with the cloud, new version against the previous one;
- `cli`: the `edgecascade models` subcommand.
"""

"""The broker: Mosquitto 2.x configuration and the tools around it.

`broker` owns the project's Mosquitto settings (`edgecascade.conf`: no anonymous access, TCP_NODELAY,
persistence), the topic ACL (`edgecascade.acl`, `%u` patterns that fence each device to its own topics), the
password and test-certificate tooling, and `launcher`, which starts a private Mosquitto on a free port with
generated credentials for tests, the benchmark and the fleet simulation, and stops it cleanly.
"""

from broker.launcher import BrokerProcess, Credentials, find_free_port

__all__ = ["BrokerProcess", "Credentials", "find_free_port"]

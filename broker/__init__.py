"""The broker: Mosquitto 2.x configuration and the tools around it.

`broker` owns the project's Mosquitto settings (`edgecascade.conf`: no anonymous access, TCP_NODELAY,
persistence), the devices' topic ACL (`edgecascade.acl`, `%u` patterns that fence each device to its own
topics), the accounts and roles of the dynamic-security plugin (`dynsec`, `edgecascade-roles.json`: client ids
bound to device accounts, the shared subscription for cloud accounts only), the test-certificate tooling, and
`launcher`, which starts a private Mosquitto on a free port with generated credentials (kept across restarts
of one work directory) for tests, the benchmark, the fleet simulation and `edgecascade broker`.
"""

from broker.launcher import BrokerProcess, Credentials, find_free_port

__all__ = ["BrokerProcess", "Credentials", "find_free_port"]

"""The Sedna-style peer: hard examples sent to the cloud by HTTP request/response, one POST per sample.

KubeEdge Sedna's joint inference posts each hard example to a cloud HTTP service and blocks for the answer.
We reproduce that shape with the same models and the same MEANet filter, so the benchmark can put our MQTT
path beside what a user would otherwise deploy. The server is stdlib `http.server` (one small endpoint; no
framework needed). Two clients (`HTTP_STYLES`):

- `keepalive`: one HTTP/1.1 connection kept alive, the raw image bytes, Nagle off — the best case for HTTP;
- `sedna`: what Sedna's own client does (lib/sedna/service/client.py `ModelClient.inference`, called by
  `JointInference.inference` with `data.tolist()`): `requests.request` per hard example, a session of its own
  and so a new TCP connection each time (a handshake's round trip before the request's), and the image as a
  JSON list of numbers. Nagle is off there too (urllib3's default socket options).
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from cloud_worker.model import CloudSession
from device_agent.cascade import EdgeCascade
from device_agent.rule import softmax
from protocol.records import InferenceRecord

logger = logging.getLogger(__name__)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = (
        True  # as our MQTT clients do: a fair peer, not one slowed by Nagle + delayed ACK
    )
    server: CloudHTTPServer

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        try:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            if self.headers.get("Content-Type") == "application/json":  # Sedna's {"data": image.tolist()}
                image = np.asarray(json.loads(body)["data"], dtype=np.uint8)
            else:
                shape = [int(d) for d in self.headers["X-Shape"].split(",")]
                image = np.frombuffer(body, dtype=np.uint8).reshape(shape)
        except (KeyError, ValueError, TypeError) as exc:
            self.send_error(400, f"bad request: {exc}")
            return
        start = time.perf_counter()
        with self.server.model_lock:
            probs = softmax(self.server.model.logits(image[None]))[0]
        cloud_ms = (time.perf_counter() - start) * 1e3
        reply = json.dumps(
            {"prediction": int(probs.argmax()), "p": float(probs.max()), "cloud_ms": cloud_ms}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, fmt: str, *args: object) -> None:
        logger.debug(fmt, *args)


HTTP_STYLES = ("keepalive", "sedna")


class CloudHTTPServer(ThreadingHTTPServer):
    """POST /infer with the raw uint8 image (header X-Shape: C,H,W), or JSON {"data": nested lists} ->
    JSON {prediction, p, cloud_ms}."""

    daemon_threads = True

    def __init__(
        self,
        model_path: Path,
        providers: Sequence[str],
        threads: Optional[int] = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        super().__init__((host, port), _Handler)
        # The cloud worker's own session and settings: the comparison is of transports, not of sessions.
        self.model = CloudSession(model_path, list(providers), threads)
        self.model_lock = threading.Lock()  # one onnxruntime session, like one Sedna cloud pod
        self.connections = 0  # accepted so far (one per request for Sedna's client)
        self._thread = threading.Thread(target=self.serve_forever, name="http-cloud", daemon=True)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections += 1  # only the accepting thread counts
        super().process_request(request, client_address)

    @property
    def url(self) -> Tuple[str, int]:
        host, port = self.server_address[:2]
        return str(host), int(port)

    def __enter__(self) -> CloudHTTPServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


@dataclass
class HttpRunResult:
    records: List[InferenceRecord] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def throughput(self) -> float:
        return len(self.records) / self.seconds if self.seconds else 0.0


def run_http_peer(
    cascade: EdgeCascade,
    samples: Iterable[Tuple[np.ndarray, Optional[int]]],
    server: Tuple[str, int],
    *,
    run_id: str,
    device_id: str,
    style: str = "keepalive",
    progress: Optional[object] = None,
) -> HttpRunResult:
    """Edge cascade per sample; each complex sample is POSTed and the device blocks for the answer, over one
    kept-alive connection or, `style="sedna"`, a new one each time with a JSON body (module docstring)."""
    if style not in HTTP_STYLES:
        raise ValueError(f"style must be one of {HTTP_STYLES}, got {style!r}")
    kept = _connect(server) if style == "keepalive" else None
    result = HttpRunResult()
    start = time.perf_counter()
    for seq, (image, label) in enumerate(samples):
        decision = cascade.decide(image[None])[0]
        record = InferenceRecord(
            run_id=run_id,
            device_id=device_id,
            seq=seq,
            label=label,
            prediction=decision.prediction,
            exit_stage=decision.exit_stage,
            edge_ms=decision.edge_ms,
            p_main=decision.p_main,
            p_ext=decision.p_ext,
            ts_unix=time.time(),
        )
        if decision.complex:
            if kept is not None:
                body = np.ascontiguousarray(image).tobytes()
                headers = {"X-Shape": ",".join(map(str, image.shape))}
            else:
                body = json.dumps({"data": image.tolist()}).encode()
                headers = {"Content-Type": "application/json"}
            sent = time.perf_counter()
            conn = kept if kept is not None else _connect(server)
            conn.request("POST", "/infer", body=body, headers=headers)
            response = conn.getresponse()
            reply = json.loads(response.read())
            if kept is None:
                conn.close()
            round_ms = (time.perf_counter() - sent) * 1e3
            record.exit_stage = "cloud"
            record.prediction = int(reply["prediction"])
            record.p_cloud = float(reply["p"])
            record.cloud_ms = float(reply["cloud_ms"])
            record.network_ms = max(round_ms - record.cloud_ms, 0.0)
            record.bytes_up = len(body)
            record.bytes_down = int(response.getheader("Content-Length") or 0)
        result.records.append(record)
        if progress is not None:
            progress.update(1)  # type: ignore[attr-defined]
    result.seconds = time.perf_counter() - start
    if kept is not None:
        kept.close()
    return result


def _connect(server: Tuple[str, int]) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(*server)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # headers and body go as separate writes
    return conn


def main() -> None:
    """`python -m bench.http_baseline --models DIR [--port N]`: serve the cloud model until SIGTERM."""
    import argparse
    import signal

    from edgecascade.systemd import notify

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--models", type=Path, default=Path("models/fashion-mnist"))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"])
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads (as the cloud worker's)")
    args = parser.parse_args()
    server = CloudHTTPServer(args.models / "cloud.onnx", args.providers, args.threads, port=args.port)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"http peer on {server.url[0]}:{server.url[1]}", flush=True)
    notify("READY=1")
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()

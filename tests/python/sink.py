"""A stock OTLP upstream with the limits real ones have, for the end-to-end tests.

Usage: sink.py grpc|http PORT OUT [LIMIT_BYTES]

SINK_DELAY_SECONDS (grpc): each export waits this long before it is taken, as a slow backend
does: a sink killed meanwhile has taken nothing of the requests in progress.

grpc: a plain grpcio server with opentelemetry-proto's TraceService and grpcio's default
options, so it refuses messages over 4 MiB (after decompression) with RESOURCE_EXHAUSTED
"Received message larger than max" — the default of grpcio, grpc-go, the OpenTelemetry
Collector's `max_recv_msg_size_mib`, and Tempo.
http: an OTLP/HTTP (protobuf) receiver on the standard library's HTTP server that answers
413 to bodies over LIMIT_BYTES (decompressed), as a proxy or the Collector's
`max_request_body_size` does.

Every accepted span is appended to OUT as one line `<trace id hex> <span id hex>`; every
request as `# request <bytes> <spans>`; every refusal as `# refused <bytes>`. The line
`listening` on stdout says it is ready.
"""

import gzip
import os
import sys
import time
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

lock = threading.Lock()


def record(out, request, size):
    lines = [f"# request {size} {sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)}\n"]
    for rs in request.resource_spans:
        for ss in rs.scope_spans:
            for span in ss.spans:
                lines.append(f"{span.trace_id.hex()} {span.span_id.hex()}\n")
    with lock:
        out.write("".join(lines))
        out.flush()


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out):
        self.out = out

    def Export(self, request, context):
        time.sleep(float(os.environ.get("SINK_DELAY_SECONDS", "0")))
        record(self.out, request, request.ByteSize())
        return trace_service_pb2.ExportTraceServiceResponse()


def serve_grpc(port, out):
    # grpcio's defaults: grpc.max_receive_message_length is 4 MiB.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(out), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("listening", flush=True)
    server.wait_for_termination()


def serve_http(port, out, limit):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding", "") == "gzip":
                body = gzip.decompress(body)
            if len(body) > limit:
                with lock:
                    out.write(f"# refused {len(body)}\n")
                    out.flush()
                self.send_response(413)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            record(out, request, len(body))
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print("listening", flush=True)
    server.serve_forever()


def main():
    kind, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    out = open(path, "a")
    if kind == "grpc":
        serve_grpc(port, out)
    else:
        serve_http(port, out, int(sys.argv[4]))


if __name__ == "__main__":
    main()

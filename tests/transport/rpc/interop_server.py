"""A stock Python grpcio server for Ferry's client to call (rpc_interop_client): it serves
interop.proto's Echo with a 64 KiB receive limit and reports whether it saw the client's
cancellations.

usage: interop_server.py RPC_INTEROP_CLIENT_BINARY OUT_DIR"""
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc

from interop_common import load_stubs

LIMIT = 64 * 1024


def main():
    binary, out_dir = sys.argv[1], sys.argv[2]
    pb, pb_grpc, _, _ = load_stubs(out_dir)
    cancelled = threading.Event()

    class Echo(pb_grpc.EchoServicer):
        def Unary(self, req, ctx):
            payload = b"y" * req.response_size if req.response_size else req.payload
            return pb.EchoResponse(text=req.text, payload=payload)

        def Stream(self, req, ctx):
            for i in range(req.count):
                if not ctx.is_active():
                    cancelled.set()
                    return
                if req.interval_ms:
                    time.sleep(req.interval_ms / 1000.0)
                yield pb.EchoResponse(seq=i, payload=b"z" * req.size)

        def Slow(self, req, ctx):
            end = time.monotonic() + req.delay_ms / 1000.0
            while time.monotonic() < end:
                if not ctx.is_active():
                    cancelled.set()
                    ctx.abort(grpc.StatusCode.CANCELLED, "gone")
                time.sleep(0.01)
            return pb.EchoResponse(text="slow")

        def Fail(self, req, ctx):
            ctx.abort(grpc.StatusCode(next(c for c in grpc.StatusCode
                                           if c.value[0] == req.code).value), req.message)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                         options=[("grpc.max_receive_message_length", LIMIT),
                                  ("grpc.max_send_message_length", 8 << 20)])
    pb_grpc.add_EchoServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        rc = subprocess.call([binary, "127.0.0.1:%d" % port, str(LIMIT)], timeout=180)
    finally:
        server.stop(grace=1)
    if not cancelled.wait(timeout=5):
        print("FAIL the server never saw a cancellation from the client")
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())

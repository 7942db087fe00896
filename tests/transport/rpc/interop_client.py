"""A stock Python grpcio client calls Ferry's rpc server (rpc_echo_server): unary, Health,
10,000 streamed messages, deadline, client cancel mid-stream, messages near and over the
size limit, unknown methods, status codes and metadata auth; all of it in cleartext (h2c),
then again over TLS (certificates from tests/fixtures/tls/make_certs.sh, the client trusting
the test CA).

usage: interop_client.py RPC_ECHO_SERVER_BINARY OUT_DIR"""
import os
import subprocess
import sys
import threading

import grpc

from interop_common import Checks, load_stubs

LIMIT = 64 * 1024


def expect_code(code, fn):
    try:
        fn()
    except grpc.RpcError as e:
        if e.code() != code:
            raise AssertionError("got %s (%s), want %s" % (e.code(), e.details(), code))
        return e
    raise AssertionError("call succeeded, want %s" % code)


def main():
    binary, out_dir = sys.argv[1], sys.argv[2]
    pb, pb_grpc, fpb, fpb_grpc = load_stubs(out_dir)
    certs = os.path.join(out_dir, "tls")
    subprocess.run(["sh", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                       "../../fixtures/tls/make_certs.sh"), certs], check=True)
    with open(os.path.join(certs, "ca.crt"), "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    rc = serve_and_check(binary, [], None, pb, pb_grpc, fpb, fpb_grpc)
    if rc == 0:
        print("-- again over TLS")
        rc = serve_and_check(binary, ["--tls-cert", os.path.join(certs, "chain.crt"),
                                      "--tls-key", os.path.join(certs, "server.key")],
                             creds, pb, pb_grpc, fpb, fpb_grpc)
    return rc


def serve_and_check(binary, extra, creds, pb, pb_grpc, fpb, fpb_grpc):
    srv = subprocess.Popen([binary, "--max-message", str(LIMIT), "--token", "s3cret"] + extra,
                           stdout=subprocess.PIPE, text=True)
    try:
        line = srv.stdout.readline().split()
        if len(line) != 2 or line[0] != "PORT":
            print("server did not start: %r" % line)
            return 1
        addr = ("localhost:" if creds else "127.0.0.1:") + line[1]
        rc = run_checks(addr, creds, pb, pb_grpc, fpb, fpb_grpc)
    finally:
        srv.terminate()
        try:
            code = srv.wait(timeout=10)
        except subprocess.TimeoutExpired:
            srv.kill()
            code = -1
    if code != 0:
        print("server exited with %d after SIGTERM (want a clean drain)" % code)
        return 1
    return rc


def run_checks(addr, creds, pb, pb_grpc, fpb, fpb_grpc):
    c = Checks()
    opts = [("grpc.max_receive_message_length", 8 << 20)]
    channel = (grpc.secure_channel(addr, creds, options=opts) if creds
               else grpc.insecure_channel(addr, options=opts))
    echo = pb_grpc.EchoStub(channel)
    health = fpb_grpc.FerryStub(channel)
    md = (("authorization", "Bearer s3cret"),)

    def unary():
        r = echo.Unary(pb.EchoRequest(text="hello", payload=b"\x01" * 1000), metadata=md,
                       timeout=10)
        assert r.text == "hello" and r.payload == b"\x01" * 1000

    def from_thread():
        r = echo.Unary(pb.EchoRequest(text="t", from_thread=True), metadata=md, timeout=10)
        assert r.text == "t"

    def health_call():
        r = health.Health(fpb.HealthRequest(), timeout=10)  # no token needed for Health
        assert r.status == fpb.HealthResponse.SERVING, r

    def stream_10000():
        n = 0
        for m in echo.Stream(pb.StreamRequest(count=10000, size=32), metadata=md, timeout=60):
            assert m.seq == n and len(m.payload) == 32
            n += 1
        assert n == 10000, n

    def concurrent_64():
        futs = [echo.Unary.future(pb.EchoRequest(text=str(i)), metadata=md, timeout=30)
                for i in range(64)]
        assert [f.result().text for f in futs] == [str(i) for i in range(64)]

    def parallel_streams():
        errors = []

        def one():
            try:
                n = sum(1 for _ in echo.Stream(pb.StreamRequest(count=500, size=64),
                                               metadata=md, timeout=60))
                if n != 500:
                    errors.append(n)
            except Exception as e:
                errors.append(e)
        ts = [threading.Thread(target=one) for _ in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors, errors

    def deadline():
        expect_code(grpc.StatusCode.DEADLINE_EXCEEDED,
                    lambda: echo.Slow(pb.SlowRequest(delay_ms=5000), metadata=md, timeout=0.2))

    def cancel_mid_stream():
        it = echo.Stream(pb.StreamRequest(count=1000, size=8, interval_ms=5), metadata=md,
                         timeout=30)
        got = 0
        for _ in it:
            got += 1
            if got == 3:
                it.cancel()
                break
        assert got == 3
        assert it.code() == grpc.StatusCode.CANCELLED, it.code()

    def near_limit():
        r = echo.Unary(pb.EchoRequest(payload=b"x" * (LIMIT - 16)), metadata=md, timeout=10)
        assert len(r.payload) == LIMIT - 16

    def over_limit():
        expect_code(grpc.StatusCode.RESOURCE_EXHAUSTED,
                    lambda: echo.Unary(pb.EchoRequest(payload=b"x" * (LIMIT + 100)),
                                       metadata=md, timeout=10))

    def unknown_method():
        call = channel.unary_unary("/ferry.test.Echo/Nope",
                                   request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        expect_code(grpc.StatusCode.UNIMPLEMENTED, lambda: call(b"", metadata=md, timeout=10))
        call = channel.unary_unary("/no.Such/Method",
                                   request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        expect_code(grpc.StatusCode.UNIMPLEMENTED, lambda: call(b"", metadata=md, timeout=10))

    def status_codes():
        for code in grpc.StatusCode:
            if code == grpc.StatusCode.OK:
                continue
            e = expect_code(code, lambda: echo.Fail(
                pb.FailRequest(code=code.value[0], message="why: \u00fc 100%"), metadata=md,
                timeout=10))
            assert e.details() == "why: \u00fc 100%", e.details()

    def auth():
        expect_code(grpc.StatusCode.UNAUTHENTICATED,
                    lambda: echo.Unary(pb.EchoRequest(), timeout=10))
        expect_code(grpc.StatusCode.UNAUTHENTICATED,
                    lambda: echo.Unary(pb.EchoRequest(),
                                       metadata=(("authorization", "Bearer nope"),), timeout=10))

    for name, fn in [("unary", unary), ("unary answered from a thread", from_thread),
                     ("health", health_call), ("stream 10000", stream_10000),
                     ("64 concurrent unary", concurrent_64),
                     ("8 parallel streams", parallel_streams), ("deadline", deadline),
                     ("cancel mid-stream", cancel_mid_stream), ("near the limit", near_limit),
                     ("over the limit", over_limit), ("unknown method", unknown_method),
                     ("status codes", status_codes), ("bearer token", auth),
                     ("still serving", unary)]:
        c.run(name, fn)
    channel.close()
    return c.finish()


if __name__ == "__main__":
    sys.exit(main())

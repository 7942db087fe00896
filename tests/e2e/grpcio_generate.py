"""A stock gRPC client (Python grpcio, stubs generated from proto/ferry.proto at test time)
streams a generation from ferry-router, with ferry-prefill and ferry-decode behind it, all three
started here on free ports with the real model (missing model = failure).

usage: grpcio_generate.py BUILD_ROOT STUB_DIR
"""
import importlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def load_stubs(out_dir):
    from grpc_tools import protoc
    import grpc_tools

    src = os.environ.get("FERRY_SOURCE_ROOT") or os.path.abspath(
        os.path.join(os.path.dirname(__file__), "..", ".."))
    os.makedirs(out_dir, exist_ok=True)
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    proto_dir = os.path.join(src, "proto")
    rc = protoc.main(["grpc_tools.protoc", "-I" + proto_dir, "-I" + include,
                      "--python_out=" + out_dir, "--grpc_python_out=" + out_dir,
                      os.path.join(proto_dir, "ferry.proto")])
    if rc != 0:
        raise RuntimeError("protoc failed on ferry.proto")
    sys.path.insert(0, out_dir)
    return importlib.import_module("ferry_pb2"), importlib.import_module("ferry_pb2_grpc")


def main():
    build, stub_dir = sys.argv[1], sys.argv[2]
    src = os.environ.get("FERRY_SOURCE_ROOT", ".")
    model = os.environ.get("FERRY_MODEL") or os.path.join(
        src, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(model):
        print("missing model %s: run scripts/setup.sh" % model)
        return 1
    import grpc

    pb, pb_grpc = load_stubs(stub_dir)
    work = tempfile.mkdtemp(prefix="ferry-grpcio-")
    procs = []

    def start(name, args):
        log = open(os.path.join(work, name + ".log"), "w")
        p = subprocess.Popen([os.path.join(build, args[0])] + args[1:], stdout=log,
                             stderr=subprocess.STDOUT)
        procs.append((name, p))
        return p

    def wait_port_file(path, name):
        for _ in range(600):
            if os.path.exists(path) and open(path).read().strip():
                return int(open(path).read())
            time.sleep(0.1)
        raise RuntimeError(name + " did not start")

    try:
        rport_file = os.path.join(work, "router.port")
        start("router", ["router/ferry-router", "--model", model, "--listen", "127.0.0.1:0",
                         "--port-file", rport_file, "--log-level", "warn"])
        router = "127.0.0.1:%d" % wait_port_file(rport_file, "router")
        start("decode", ["decode/ferry-decode", "--model", model,
                         "--listen", "127.0.0.1:%d" % free_port(),
                         "--kv-listen", "127.0.0.1:%d" % free_port(), "--router", router,
                         "--threads", "1", "--log-level", "warn"])
        start("prefill", ["prefill/ferry-prefill", "--model", model, "--listen", "127.0.0.1:0",
                          "--router", router, "--threads", "1", "--log-level", "warn"])
        channel = grpc.insecure_channel(router)
        stub = pb_grpc.FerryStub(channel)
        deadline = time.time() + 300
        while True:
            try:
                h = stub.Health(pb.HealthRequest(), timeout=5)
                if h.status == pb.HealthResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if time.time() > deadline:
                raise RuntimeError("router never became ready")
            time.sleep(0.2)

        req = pb.GenerateRequest(
            chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user",
                                                          content="What is the capital of France?")]),
            sampling=pb.SamplingParams(temperature=0, max_tokens=24),
            codec=pb.CodecParams(policy="fp16"),
            return_token_ids=True, request_id="py-1")
        chunks = list(stub.Generate(req, timeout=300))
        text = "".join(c.text for c in chunks)
        ids = [i for c in chunks for i in c.token_ids]
        last = chunks[-1]
        print("streamed %d messages, %d tokens: %r" % (len(chunks), len(ids), text))
        assert len(chunks) >= 2, "expected several streamed messages"
        assert last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
        assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
        assert all(c.request_id == "py-1" for c in chunks)
        assert last.stats.prompt_tokens > 0 and last.stats.ttft_ms > 0
        assert last.stats.kv_wire_bytes > last.stats.kv_raw_bytes > 0
        assert "Paris" in text, text
        # The same request unary gives the same text.
        whole = stub.Complete(req, timeout=300)
        assert whole.text == text, (whole.text, text)
        assert list(whole.token_ids) == ids
        # Errors come back as gRPC statuses.
        try:
            stub.Generate(pb.GenerateRequest(prompt="x", model="nope"), timeout=30).next()
            raise AssertionError("an unknown model must fail")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND, e.code()
        # Tokenize: a stock client parses the reply even where the vocabulary splits a
        # character over byte tokens (SmolLM2 does for these CJK characters; pieces are proto3
        # strings, such bytes show U+FFFD), and whole characters come back as they are.
        text = "smile \U0001F642, \u65e5\u672c\u8a9e ok"
        tk = stub.Tokenize(pb.TokenizeRequest(text=text), timeout=30)
        assert len(tk.ids) == len(tk.pieces) > 0, (len(tk.ids), len(tk.pieces))
        joined = "".join(tk.pieces)
        assert joined.startswith("smile \U0001F642,"), tk.pieces
        assert joined.endswith(" ok") and "\ufffd" in joined, tk.pieces
        channel.close()
        print("1 passed, 0 failed")
        return 0
    finally:
        for name, p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in reversed(procs):
            try:
                rc = p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                rc = p.wait()
            if rc != 0:
                print("%s exited %s; log:" % (name, rc))
                print(open(os.path.join(work, name + ".log")).read())


if __name__ == "__main__":
    sys.exit(main())

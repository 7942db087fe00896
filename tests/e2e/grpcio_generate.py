"""A stock gRPC client (Python grpcio, stubs generated from proto/ferry.proto at test time)
streams a generation from ferry-router, with ferry-prefill and ferry-decode behind it, all three
started here on free ports with the real model (missing model = failure).

usage: grpcio_generate.py BUILD_ROOT STUB_DIR
"""
import importlib
import os
import sys
import time

from local_cluster import LocalCluster, model_path


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
    model = model_path()
    if model is None:
        return 1
    import grpc

    pb, pb_grpc = load_stubs(stub_dir)
    with LocalCluster(build, model) as cluster:
        router = cluster.router
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


if __name__ == "__main__":
    sys.exit(main())

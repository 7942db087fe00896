"""Shared helpers of the gRPC interop tests: Python stubs generated at test time with
grpc_tools.protoc from interop.proto and proto/ferry.proto into a build folder."""
import importlib
import os
import sys


def load_stubs(out_dir):
    """Generates and imports interop_pb2(_grpc) and ferry_pb2(_grpc); returns the modules."""
    from grpc_tools import protoc
    import grpc_tools

    src = os.environ.get("FERRY_SOURCE_ROOT") or os.path.abspath(
        os.path.join(os.path.dirname(__file__), "..", "..", ".."))
    os.makedirs(out_dir, exist_ok=True)
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    for proto_dir, name in ((os.path.join(src, "tests", "transport", "rpc"), "interop.proto"),
                            (os.path.join(src, "proto"), "ferry.proto")):
        rc = protoc.main(["grpc_tools.protoc", "-I" + proto_dir, "-I" + include,
                          "--python_out=" + out_dir, "--grpc_python_out=" + out_dir,
                          os.path.join(proto_dir, name)])
        if rc != 0:
            raise RuntimeError("protoc failed on " + name)
    sys.path.insert(0, out_dir)
    return (importlib.import_module("interop_pb2"), importlib.import_module("interop_pb2_grpc"),
            importlib.import_module("ferry_pb2"), importlib.import_module("ferry_pb2_grpc"))


class Checks:
    """Counts named checks and prints 'N passed, N failed' at the end."""

    def __init__(self):
        self.passed = 0
        self.failed = 0

    def run(self, name, fn):
        try:
            fn()
            self.passed += 1
            print("ok   " + name, flush=True)
        except Exception as e:  # a failed check must not stop the others
            self.failed += 1
            print("FAIL %s: %r" % (name, e), flush=True)

    def finish(self):
        print("%d passed, %d failed" % (self.passed, self.failed), flush=True)
        return 0 if self.failed == 0 and self.passed > 0 else 1

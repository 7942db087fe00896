"""`ferry health ADDR` against Ferry's rpc server (rpc_echo_server): SERVING with exit 0, an
unreachable address with exit 1 and a clear message, bad usage with exit 2.

usage: cli_health_test.py FERRY_BINARY RPC_ECHO_SERVER_BINARY"""
import subprocess
import sys


def main():
    ferry, server = sys.argv[1], sys.argv[2]
    srv = subprocess.Popen([server], stdout=subprocess.PIPE, text=True)
    failures = 0
    try:
        port = srv.stdout.readline().split()[1]
        cases = [
            ([ferry, "health", "127.0.0.1:" + port], 0, "SERVING role=echo"),
            ([ferry, "health", "127.0.0.1:1", "--timeout", "2000"], 1, "UNAVAILABLE"),
            ([ferry, "health"], 2, "usage"),
            ([ferry, "health", "127.0.0.1:" + port, "--timeout", "soon"], 2, "bad --timeout"),
        ]
        for argv, want_rc, want_text in cases:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            out = p.stdout + p.stderr
            ok = p.returncode == want_rc and want_text in out
            failures += not ok
            print("%s %s -> %d %r" % ("ok  " if ok else "FAIL", " ".join(argv[1:]),
                                      p.returncode, out.strip()))
    finally:
        srv.terminate()
        srv.wait(timeout=10)
    print("%d passed, %d failed" % (4 - failures, failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

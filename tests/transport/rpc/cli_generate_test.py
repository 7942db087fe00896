"""`ferry generate` through a router that cannot be reached: exit 1, the status on stderr and
nothing on stdout (stdout carries only generated text, so a script that captures it gets an
empty string, not a stray newline); no prompt: usage and exit 2.

usage: cli_generate_test.py FERRY_BINARY"""
import subprocess
import sys


def main():
    ferry = sys.argv[1]
    cases = [
        ([ferry, "generate", "127.0.0.1:1", "--timeout", "2s", "hi"], 1, "UNAVAILABLE"),
        ([ferry, "generate", "127.0.0.1:1"], 2, "usage"),
    ]
    failures = 0
    for argv, want_rc, want_err in cases:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        ok = p.returncode == want_rc and want_err in p.stderr and p.stdout == ""
        failures += not ok
        print("%s %s -> %d stdout=%r stderr=%r" % ("ok  " if ok else "FAIL", " ".join(argv[1:]),
                                                   p.returncode, p.stdout, p.stderr.strip()))
    print("%d passed, %d failed" % (len(cases) - failures, failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

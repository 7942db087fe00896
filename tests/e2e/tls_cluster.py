"""A local cluster with TLS everywhere (router, prefill and decode each with
--tls-cert/--tls-key, the test CA verifying them): the workers register and serve, `ferry
health` and `ferry generate` reach the router with --tls-ca, the stock OpenAI client reaches
its HTTPS port trusting the CA, GET /metrics answers inside TLS; a cleartext client, one that
does not trust the certificate and plain HTTP are refused; the KV frames cross sealed. Certificates come from
tests/fixtures/tls/make_certs.sh.

usage: tls_cluster.py BUILD_ROOT
"""
import os
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

from local_cluster import Checks, LocalCluster, model_path

PROMPT = "The capital of France is"


def main():
    build = sys.argv[1]
    model = model_path()
    if model is None:
        return 1
    import openai

    check = Checks()

    certs = tempfile.mkdtemp(prefix="ferry-tls-")
    src = os.environ.get("FERRY_SOURCE_ROOT", ".")
    subprocess.run(["sh", os.path.join(src, "tests/fixtures/tls/make_certs.sh"), certs],
                   check=True)
    ca = os.path.join(certs, "ca.crt")
    tls = ["--tls-cert", os.path.join(certs, "chain.crt"),
           "--tls-key", os.path.join(certs, "server.key")]
    ferry = os.path.join(build, "client/ferry")
    env = dict(os.environ, FERRY_TLS_CA="")
    with tempfile.TemporaryDirectory() as work:
        http_port_file = os.path.join(work, "http.port")
        with LocalCluster(build, model, daemon_args=tls,
                          router_args=["--model-name", "smollm2", "--http-listen", "127.0.0.1:0",
                                       "--http-port-file", http_port_file]) as c:
            http_port = c.wait_port(http_port_file, "router HTTP")
            serving = False
            for _ in range(600):
                p = subprocess.run([ferry, "health", c.router, "--tls-ca", ca],
                                   capture_output=True, text=True, env=env)
                if p.returncode == 0 and "NOT_SERVING" not in p.stdout:
                    serving = True
                    break
                time.sleep(0.2)
            check("workers registered over TLS; ferry health --tls-ca", serving, p.stdout.strip())

            p = subprocess.run([ferry, "generate", "--router", c.router, "--tls-ca", ca,
                                "--temperature", "0", "--max-tokens", "8", "--policy", "fp16",
                                PROMPT],
                               capture_output=True, text=True, env=env, timeout=120)
            text = p.stdout.strip()
            check("ferry generate --tls-ca", p.returncode == 0 and len(text) > 0,
                  repr(text) + " " + p.stderr.strip()[-200:])

            p = subprocess.run([ferry, "generate", "--router", c.router, "--max-tokens", "4",
                                "--timeout", "5s", PROMPT],
                               capture_output=True, text=True, env=env, timeout=60)
            check("a cleartext client is refused", p.returncode != 0, p.stderr.strip()[-200:])
            p = subprocess.run([ferry, "generate", "--router", c.router, "--max-tokens", "4",
                                "--tls-ca", os.path.join(certs, "other.crt"), "--timeout", "5s",
                                PROMPT], capture_output=True, text=True, env=env, timeout=60)
            check("a client that does not trust the certificate is refused",
                  p.returncode != 0 and "certificate" in p.stderr, p.stderr.strip()[-200:])

            client = openai.OpenAI(base_url="https://127.0.0.1:%d/v1" % http_port,
                                   api_key="none",
                                   http_client=openai.DefaultHttpx2Client(
                                       verify=ssl.create_default_context(cafile=ca)),
                                   max_retries=0)
            r = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=8,
                                          temperature=0, extra_body={"kv_policy": "fp16"})
            check("OpenAI client over HTTPS: the gRPC CLI's greedy text",
                  r.choices[0].text.strip() == text, repr(r.choices[0].text))
            chunks = client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "Say hello."}],
                max_tokens=8, temperature=0, stream=True)
            streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            check("a stream over HTTPS", len(streamed) > 0, repr(streamed))
            try:
                urllib.request.urlopen("http://127.0.0.1:%d/v1/models" % http_port, timeout=10)
                check("plain HTTP to the HTTPS port is refused", False)
            except Exception as e:  # the server drops what is not a TLS handshake
                check("plain HTTP to the HTTPS port is refused", True, type(e).__name__)

            ctx = ssl.create_default_context(cafile=ca)
            body = urllib.request.urlopen("https://127.0.0.1:%d/metrics" % c.router_port,
                                          context=ctx, timeout=10).read().decode()
            check("GET /metrics inside TLS on the gRPC port",
                  "ferry_router_workers" in body)
            # With TLS the router seals the KV frames (--kv-seal auto): the decode worker opened
            # every frame of the requests above (30 layers each).
            body = urllib.request.urlopen("https://127.0.0.1:%d/metrics" % c.decode_port,
                                          context=ctx, timeout=10).read().decode()
            opened = [float(line.split()[-1]) for line in body.splitlines()
                      if line.startswith("ferry_decode_frames_opened_total ")]
            check("KV frames sealed under TLS", opened and opened[0] >= 3 * 30, opened)
    return check.finish()


if __name__ == "__main__":
    sys.exit(main())

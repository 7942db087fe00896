"""The stock OpenAI Python client against ferry-router's OpenAI-compatible API (--http-listen),
with ferry-prefill and ferry-decode behind it, all three started here on free ports with the
real model (missing model = failure): greedy answers equal the gRPC CLI's, streams equal whole
answers, Ferry's codec is chosen per request, log-probabilities come with the tokens, errors
come back as the client's exceptions (a wrong API key among them; the key guards the gRPC
client service too), a stream closed early is cancelled upstream.

usage: openai_api.py BUILD_ROOT
"""
import json
import os
import subprocess
import sys
import time
import urllib.request

from local_cluster import Checks, LocalCluster, model_path


def metric(port, name):
    text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10).read()
    for line in text.decode().splitlines():
        if line.startswith(name + " "):  # name with its labels, as the exposition writes it
            return float(line.split(" ")[-1])
    return 0.0


def main():
    build = sys.argv[1]
    model = model_path()
    if model is None:
        return 1
    import openai

    check = Checks()

    # The cluster's API key, from the environment of every daemon (and of the CLI below).
    os.environ["FERRY_API_KEY"] = "e2e-key"
    keyless = {k: v for k, v in os.environ.items() if k not in ("FERRY_API_KEY", "FERRY_TOKEN")}
    cluster = LocalCluster(build, model)
    http_port_file = cluster.port_file("http")
    cluster.router_args = ["--http-listen", "127.0.0.1:0", "--http-port-file", http_port_file,
                           "--model-name", "smollm2"]
    with cluster:
        hport = cluster.wait_port(http_port_file, "router (http)")
        rport, router = cluster.router_port, cluster.router
        deadline = time.time() + 300
        while True:
            try:
                if urllib.request.urlopen("http://127.0.0.1:%d/health" % hport,
                                          timeout=5).status == 200:
                    break
            except Exception:
                pass
            if time.time() > deadline:
                raise RuntimeError("the HTTP API never became ready")
            time.sleep(0.2)

        client = openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % hport, api_key="e2e-key",
                               timeout=300, max_retries=0)
        try:
            openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % hport, api_key="wrong",
                          max_retries=0).models.list()
            check("wrong API key refused", False)
        except openai.AuthenticationError as e:
            check("wrong API key refused", "API key" in str(e), e)
        # The same key guards the gRPC client service; its Health stays open for probes.
        p = subprocess.run([os.path.join(build, "client/ferry"), "generate", router, "hi"],
                           capture_output=True, text=True, timeout=60, env=keyless)
        check("gRPC without the key refused", p.returncode == 1
              and "UNAUTHENTICATED" in p.stderr, p.stderr.strip())
        p = subprocess.run([os.path.join(build, "client/ferry"), "health", router],
                           capture_output=True, text=True, timeout=60, env=keyless)
        check("gRPC Health open", p.returncode == 0 and "SERVING" in p.stdout, p.stdout.strip())
        # A worker without the key is not let in: its registration is refused.
        cluster.start("prefill-keyless", ["prefill/ferry-prefill", "--model", model,
                                          "--listen", "127.0.0.1:0", "--router", router,
                                          "--threads", "1", "--log-level", "warn"], env=keyless)
        deadline = time.time() + 60
        while "UNAUTHENTICATED" not in cluster.log("prefill-keyless") and time.time() < deadline:
            time.sleep(0.2)
        check("keyless worker refused", "UNAUTHENTICATED" in cluster.log("prefill-keyless")
              and metric(rport, 'ferry_router_workers{role="prefill"}') == 1,
              cluster.log("prefill-keyless").strip()[-200:])
        models = client.models.list().data
        check("models", [m.id for m in models] == ["smollm2"], [m.id for m in models])

        def cli(*args):
            p = subprocess.run([os.path.join(build, "client/ferry"), "generate", router,
                                "--token", "e2e-key", "--temperature", "0", "--policy", "fp16"]
                               + list(args),
                               capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, p.stderr
            return p.stdout[:-1] if p.stdout.endswith("\n") else p.stdout

        # Greedy chat and completion: the same text as the gRPC CLI's.
        for prompt in ["What is the capital of France?", "Name three colors."]:
            r = client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": prompt}],
                max_tokens=24, temperature=0, extra_body={"kv_policy": "fp16"})
            want = cli("--max-tokens", "24", "--chat", prompt)
            got = r.choices[0].message.content
            check("chat greedy = CLI: %s" % prompt, got == want, "%r vs %r" % (got, want))
            check("chat usage", r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
                  and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens,
                  r.usage)
            check("chat finish", r.choices[0].finish_reason in ("stop", "length"),
                  r.choices[0].finish_reason)
            # The stream carries the same text, the role first and the usage last.
            s = client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": prompt}],
                max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True},
                extra_body={"kv_policy": "fp16"})
            chunks = list(s)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            check("stream = whole: %s" % prompt, text == got, "%r vs %r" % (text, got))
            check("stream role first", chunks[0].choices[0].delta.role == "assistant")
            check("stream usage last", chunks[-1].usage is not None and not chunks[-1].choices
                  and chunks[-1].usage.completion_tokens == r.usage.completion_tokens)
            check("stream one id", len({c.id for c in chunks}) == 1)
        r = client.completions.create(model="smollm2", prompt="The capital of France is",
                                      max_tokens=12, temperature=0,
                                      extra_body={"kv_policy": "fp16"})
        want = cli("--max-tokens", "12", "The capital of France is")
        check("completion greedy = CLI", r.choices[0].text == want,
              "%r vs %r" % (r.choices[0].text, want))
        # logit_bias bans the greedy first token (its id from the CLI's --ids); the penalties
        # are taken (nothing generated yet: the first token stays).
        p = subprocess.run([os.path.join(build, "client/ferry"), "generate", router, "--token",
                            "e2e-key", "--temperature", "0", "--policy", "fp16", "--ids",
                            "--max-tokens", "1", "The capital of France is"],
                           capture_output=True, text=True, timeout=300)
        tid = int(p.stderr.split("ids:")[1].split()[0])
        first = client.completions.create(model="smollm2", prompt="The capital of France is",
                                          max_tokens=1, temperature=0,
                                          frequency_penalty=0.5, presence_penalty=0.5)
        banned = client.completions.create(model="smollm2", prompt="The capital of France is",
                                           max_tokens=1, temperature=0,
                                           logit_bias={str(tid): -100})
        check("penalties taken; logit_bias bans a token",
              first.choices[0].text == want[:len(first.choices[0].text)]
              and banned.choices[0].text != first.choices[0].text,
              (tid, first.choices[0].text, banned.choices[0].text))
        # echo: the prompt first, with its tokens' log-probabilities (lm-eval's loglikelihood
        # requests: token ids, echo, logprobs, one token); a string prompt echoes as sent.
        p = subprocess.run([os.path.join(build, "client/ferry"), "generate", router, "--token",
                            "e2e-key", "--temperature", "0", "--policy", "fp16", "--ids",
                            "--max-tokens", "8", "The capital of France is"],
                           capture_output=True, text=True, timeout=300)
        ids = [int(x) for x in p.stderr.split("ids:")[1].splitlines()[0].split()]
        ids_text = p.stdout[:-1] if p.stdout.endswith("\n") else p.stdout
        r = client.completions.create(model="smollm2", prompt=ids, max_tokens=1, temperature=0,
                                      logprobs=1, echo=True)
        lp = r.choices[0].logprobs
        check("echo of token ids with logprobs",
              len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None
              and lp.top_logprobs[0] is None
              and all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
              and r.choices[0].text.startswith(ids_text) and lp.text_offset[0] == 0
              and "".join(lp.tokens[:len(ids)]) == ids_text,
              (ids, r.choices[0].text, lp.token_logprobs))
        r = client.completions.create(model="smollm2", prompt="The capital of France is",
                                      max_tokens=4, temperature=0, echo=True)
        t = r.choices[0].text
        check("echo of a string prompt",
              t.startswith("The capital of France is")
              and want.startswith(t[len("The capital of France is"):]), repr(t))
        chunks = list(client.completions.create(model="smollm2", prompt=ids, max_tokens=4,
                                                temperature=0, logprobs=0, echo=True,
                                                stream=True))
        first = chunks[0].choices[0]
        streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        check("echo in a stream: the prompt's chunk first",
              first.text == ids_text and len(first.logprobs.tokens) == len(ids)
              and first.logprobs.token_logprobs[0] is None and streamed.startswith(ids_text)
              and len(streamed) > len(ids_text), (first.text, streamed))
        # JSON mode: response_format json_object gives one JSON object.
        r = client.chat.completions.create(
            model="smollm2", max_tokens=80, temperature=0,
            messages=[{"role": "user", "content": "Give the name and capital of France as JSON "
                                                  "with keys country and capital."}],
            response_format={"type": "json_object"})
        try:
            obj = json.loads(r.choices[0].message.content)
        except ValueError:
            obj = None
        check("response_format json_object", isinstance(obj, dict)
              and r.choices[0].finish_reason == "stop", r.choices[0].message.content)
        # Structured output: the client's own parse() with a pydantic model (nested model,
        # enum, list, optional field through $defs, anyOf and strict additionalProperties);
        # a schema the guide cannot follow is a 400 that names the keyword.
        import enum
        import typing
        import pydantic

        class Continent(str, enum.Enum):
            EUROPE = "Europe"
            ASIA = "Asia"
            AFRICA = "Africa"

        class City(pydantic.BaseModel):
            name: str = pydantic.Field(max_length=30)
            population: int = pydantic.Field(ge=1000, le=40000000)

        class Country(pydantic.BaseModel):
            name: str = pydantic.Field(max_length=30)
            capital: City
            continent: Continent
            languages: typing.List[str] = pydantic.Field(max_length=3)
            motto: typing.Optional[str] = pydantic.Field(max_length=40)

        for temperature in (0, 1):
            r = client.beta.chat.completions.parse(
                model="smollm2", max_tokens=500, temperature=temperature, seed=3,
                messages=[{"role": "user", "content": "Describe France."}],
                response_format=Country)
            check("response_format json_schema (pydantic, temperature %d)" % temperature,
                  isinstance(r.choices[0].message.parsed, Country)
                  and r.choices[0].finish_reason == "stop", r.choices[0].message.content)
        try:
            client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "x"}],
                response_format={"type": "json_schema", "json_schema": {
                    "name": "n", "schema": {"type": "object", "properties": {
                        "n": {"type": "integer", "multipleOf": 2}}}}})
            check("json_schema with multipleOf refused", False)
        except openai.BadRequestError as e:
            check("json_schema with multipleOf refused", '"multipleOf" is not supported' in str(e),
                  e)
        # Tool calling: the tools reach the prompt; "required" and a named function give one
        # call whose arguments follow the function's parameters, streamed as one delta equal
        # to the whole answer's; the assistant's call and the tool's result go back in.
        tools = [{"type": "function", "function": {
                     "name": "get_weather", "description": "The current weather in a city",
                     "parameters": {"type": "object", "required": ["city"], "properties": {
                         "city": {"type": "string", "maxLength": 40},
                         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}},
                 {"type": "function", "function": {
                     "name": "add", "description": "Add two numbers",
                     "parameters": {"type": "object", "required": ["a", "b"], "properties": {
                         "a": {"type": "number"}, "b": {"type": "number"}}}}}]
        ask = [{"role": "user", "content": "What is the weather like in Paris today?"}]
        plain = client.chat.completions.create(model="smollm2", messages=ask, max_tokens=1)
        auto = client.chat.completions.create(model="smollm2", messages=ask, tools=tools,
                                              max_tokens=40, temperature=0)
        check("tools in the prompt", auto.usage.prompt_tokens > plain.usage.prompt_tokens + 100
              and auto.choices[0].finish_reason in ("stop", "length", "tool_calls"),
              (plain.usage.prompt_tokens, auto.usage.prompt_tokens, auto.choices[0].message))

        def args_ok(call):
            a = json.loads(call.function.arguments)
            if call.function.name == "get_weather":
                return isinstance(a.get("city"), str) and set(a) <= {"city", "unit"}
            return call.function.name == "add" and all(
                isinstance(a.get(k), (int, float)) for k in "ab") and set(a) == {"a", "b"}

        for choice in ("required", {"type": "function", "function": {"name": "add"}}):
            r = client.chat.completions.create(model="smollm2", messages=ask, tools=tools,
                                               tool_choice=choice, max_tokens=80, temperature=0)
            m = r.choices[0].message
            calls = m.tool_calls or []
            check("tool_choice %s" % json.dumps(choice),
                  r.choices[0].finish_reason == "tool_calls" and m.content is None
                  and len(calls) == 1 and calls[0].id.startswith("call_") and args_ok(calls[0])
                  and (choice == "required" or calls[0].function.name == "add"), m)
            deltas = [c for c in client.chat.completions.create(
                model="smollm2", messages=ask, tools=tools, tool_choice=choice, max_tokens=80,
                temperature=0, stream=True)]
            streamed = [t for d in deltas for t in (d.choices[0].delta.tool_calls or [])]
            check("tool_choice %s streamed" % json.dumps(choice),
                  len(streamed) == 1 and streamed[0].index == 0
                  and streamed[0].function.name == calls[0].function.name
                  and streamed[0].function.arguments == calls[0].function.arguments
                  and deltas[-1].choices[0].finish_reason == "tool_calls"
                  and not any(d.choices[0].delta.content for d in deltas), streamed)
        r = client.chat.completions.create(model="smollm2", tools=tools, max_tokens=30,
                                           temperature=0, messages=ask + [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1",
             "content": '{"temperature_celsius": 21, "sky": "sunny"}'}])
        check("a tool's result answered", r.choices[0].finish_reason in ("stop", "length",
                                                                          "tool_calls"),
              r.choices[0].message)
        try:
            client.chat.completions.create(model="smollm2", messages=ask, tools=tools,
                                           tool_choice={"type": "function",
                                                        "function": {"name": "nope"}})
            check("unknown tool refused", False)
        except openai.BadRequestError as e:
            check("unknown tool refused", 'no tool "nope"' in str(e), e)
        # A batch of prompts (lm-eval sends them with batch_size > 1): choice i answers prompt i
        # as it would alone; usage counts each prompt.
        single = [client.completions.create(model="smollm2", prompt=p, max_tokens=6,
                                            temperature=0) for p in ("The capital of France is",
                                                                     "Once upon a time")]
        r = client.completions.create(model="smollm2", max_tokens=6, temperature=0,
                                      prompt=["The capital of France is", "Once upon a time"])
        check("a batch of two prompts",
              [ch.index for ch in r.choices] == [0, 1]
              and [ch.text for ch in r.choices] == [s.choices[0].text for s in single]
              and r.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in single),
              ([ch.text for ch in r.choices], r.usage))
        # A stop string ends the text before it.
        r = client.completions.create(model="smollm2", prompt="The capital of France is",
                                      max_tokens=12, temperature=0, stop=["Paris"])
        check("stop string", "Paris" not in r.choices[0].text
              and r.choices[0].finish_reason == "stop", r.choices[0])
        # Ferry's codec per request: int8 crosses the wire in about half the FP16 bytes.
        r = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4,
            temperature=0, extra_body={"kv_policy": "int8"})
        f = (r.model_extra or {}).get("ferry", {})
        check("kv_policy int8", f.get("kv_policy") == "int8"
              and 0 < f.get("kv_wire_bytes", 0) < 0.6 * f.get("kv_raw_bytes", 0), f)
        # Errors: the client's exceptions, with the server's reason.
        try:
            client.chat.completions.create(model="nope",
                                           messages=[{"role": "user", "content": "x"}])
            check("unknown model", False)
        except openai.NotFoundError as e:
            check("unknown model", "unknown model" in str(e), e)
        try:
            client.chat.completions.create(model="smollm2", logprobs=True, top_logprobs=21,
                                           messages=[{"role": "user", "content": "x"}])
            check("top_logprobs over 20 refused", False)
        except openai.BadRequestError as e:
            check("top_logprobs over 20 refused", "'top_logprobs'" in str(e), e)
        # Log-probabilities: each greedy token its own most likely alternative, the tokens
        # spelling the text, a stream carrying the same entries.
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        r = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=12,
                                           temperature=0, logprobs=True, top_logprobs=3,
                                           extra_body={"kv_policy": "fp16"})
        content = r.choices[0].logprobs.content
        check("chat logprobs", len(content) == r.usage.completion_tokens
              and "".join(t.token for t in content) == r.choices[0].message.content
              and all(t.logprob <= 0 and len(t.top_logprobs) == 3
                      and t.top_logprobs[0].token == t.token
                      and t.top_logprobs[0].logprob >= t.top_logprobs[2].logprob
                      and bytes(t.bytes).decode("utf-8", "replace") == t.token
                      for t in content), content[:2])
        s = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=12,
                                           temperature=0, logprobs=True, top_logprobs=3,
                                           stream=True, extra_body={"kv_policy": "fp16"})
        streamed = [t for c in s if c.choices and c.choices[0].logprobs
                    for t in c.choices[0].logprobs.content]
        check("chat stream logprobs = whole",
              [(t.token, round(t.logprob, 5)) for t in streamed]
              == [(t.token, round(t.logprob, 5)) for t in content], len(streamed))
        r = client.completions.create(model="smollm2", prompt="The capital of France is",
                                      max_tokens=12, temperature=0, logprobs=2,
                                      extra_body={"kv_policy": "fp16"})
        lp = r.choices[0].logprobs
        check("completion logprobs", "".join(lp.tokens) == r.choices[0].text == want
              and len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 12
              and all(len(t) == 2 for t in lp.top_logprobs)
              and lp.text_offset[1] == len(lp.tokens[0].encode()), lp.tokens)
        # The CLI's --logprobs: the same figures over gRPC, a line per token after the sum.
        p = subprocess.run([os.path.join(build, "client/ferry"), "generate", router, "--token",
                            "e2e-key", "--temperature", "0", "--policy", "fp16", "--max-tokens",
                            "12", "--logprobs", "2", "The capital of France is"],
                           capture_output=True, text=True, timeout=300)
        lines = p.stderr.splitlines()
        head = lines[0].split() if lines else []
        check("cli --logprobs", p.returncode == 0 and p.stdout[:-1] == want
              and head[:3] == ["logprobs:", "12", "tokens,"]
              and abs(float(head[4].rstrip(",")) - sum(lp.token_logprobs)) < 1e-3
              and len(lines) == 13 and all(" | " in line for line in lines[1:]), p.stderr)
        # --score: the given continuation is the completion, its tokens scored; over FP16 KV
        # the expected answer scores far higher than an unlikely one.
        sums = []
        for cont in [" Paris, the city of lights.", " Mars, the red planet."]:
            p = subprocess.run([os.path.join(build, "client/ferry"), "generate", router,
                                "--token", "e2e-key", "--policy", "fp16", "--score", cont,
                                "The capital of France is"],
                               capture_output=True, text=True, timeout=300)
            head = p.stderr.split()
            check("cli --score: %s" % cont, p.returncode == 0 and p.stdout[:-1] == cont
                  and head[0] == "logprobs:" and int(head[1]) >= 5, p.stderr[:300])
            sums.append(float(head[4].rstrip(",")) if len(head) > 4 else 0.0)
        check("cli --score ranks", sums[0] > sums[1] + 3, sums)
        # --prompt-logprobs: the prompt's tokens scored, the same sum as echo's.
        text = "The capital of France is Paris, a city on the Seine."
        p = subprocess.run([os.path.join(build, "client/ferry"), "generate", router, "--token",
                            "e2e-key", "--max-tokens", "1", "--prompt-logprobs", text],
                           capture_output=True, text=True, timeout=300)
        head = p.stderr.split()
        r = client.completions.create(model="smollm2", prompt=text, max_tokens=1, temperature=0,
                                      logprobs=0, echo=True)
        n_prompt = r.usage.prompt_tokens
        echo_sum = sum(r.choices[0].logprobs.token_logprobs[1:n_prompt])
        check("cli --prompt-logprobs = echo's", p.returncode == 0
              and head[:3] == ["prompt", "logprobs:", str(n_prompt - 1)]
              and abs(float(head[5].rstrip(",")) - echo_sum) < 1e-3, (p.stderr[:200], echo_sum))
        r = client.completions.create(model="smollm2", prompt="The capital of France is",
                                      max_tokens=4, temperature=0)
        check("no logprobs unless asked", r.choices[0].logprobs is None, r.choices[0].logprobs)
        # n = 2: two generations; greedy, so the same text twice, the tokens counted twice.
        r = client.completions.create(model="smollm2", prompt="The capital of France is",
                                      max_tokens=12, temperature=0, n=2,
                                      extra_body={"kv_policy": "fp16"})
        texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
        check("n=2", len(texts) == 2 and texts[0] == texts[1] == want
              and r.usage.completion_tokens == 2 * 12, (texts, r.usage))
        # A stream closed after two chunks is cancelled upstream.
        before = metric(rport, 'ferry_router_requests_total{status="cancelled"}')
        s = client.completions.create(model="smollm2", prompt="Write a long story about a ship.",
                                      max_tokens=400, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True})
        got = 0
        for _ in s:
            got += 1
            if got == 2:
                break
        s.close()
        deadline = time.time() + 30
        while (metric(rport, 'ferry_router_requests_total{status="cancelled"}') <= before
               and time.time() < deadline):
            time.sleep(0.1)
        after = metric(rport, 'ferry_router_requests_total{status="cancelled"}')
        check("closed stream cancelled", after == before + 1, (before, after))
        r = client.completions.create(model="smollm2", prompt="Hello", max_tokens=2)
        check("serving after the cancel", r.usage.completion_tokens >= 1, r.usage)
        if check.failures:
            for name, _ in cluster.procs:
                print("---- %s log (end)" % name)
                print(cluster.log(name)[-3000:])
    return check.finish()


if __name__ == "__main__":
    sys.exit(main())

"""The grpcio side of `ferry-bench rpc` (grpc.aio, the fastest Python grpcio API).

  bench_grpcio.py serve                  serve ferry.v1.Ferry Health and Generate; print PORT n
  bench_grpcio.py client PORT SECONDS    run the four workloads; print one RATE line each:
      unary calls/s with 1 and 64 in flight, streamed messages/s with 1 and 64 streams
Generate streams sampling.max_tokens messages, as the Ferry side does."""
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grpc  # noqa: E402
from interop_common import load_stubs  # noqa: E402

STREAM_MSGS = 1000


def stubs():
    out = os.path.join(os.environ.get("FERRY_BUILD_ROOT", "/tmp"), "bench-grpcio-py")
    return load_stubs(out)


async def serve():
    _, _, fpb, fpb_grpc = stubs()

    class Ferry(fpb_grpc.FerryServicer):
        async def Health(self, req, ctx):
            return fpb.HealthResponse(status=fpb.HealthResponse.SERVING)

        async def Generate(self, req, ctx):
            n = req.sampling.max_tokens or 1
            for _ in range(n):
                yield fpb.GenerateResponse(text="token")

    server = grpc.aio.server()
    fpb_grpc.add_FerryServicer_to_server(Ferry(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print("PORT %d" % port, flush=True)
    await server.wait_for_termination()


async def client(port, seconds):
    _, _, fpb, fpb_grpc = stubs()
    async with grpc.aio.insecure_channel("127.0.0.1:%d" % port) as ch:
        stub = fpb_grpc.FerryStub(ch)
        await stub.Health(fpb.HealthRequest())
        greq = fpb.GenerateRequest(sampling=fpb.SamplingParams(max_tokens=STREAM_MSGS))

        async def unary_worker(end, counts):
            while time.monotonic() < end:
                await stub.Health(fpb.HealthRequest())
                counts[0] += 1

        async def stream_worker(end, counts):
            while time.monotonic() < end:
                async for _ in stub.Generate(greq):
                    counts[0] += 1

        for worker, conc in ((unary_worker, 1), (unary_worker, 64), (stream_worker, 1),
                             (stream_worker, 64)):
            counts = [0]
            t0 = time.monotonic()
            await asyncio.gather(*(worker(t0 + seconds, counts) for _ in range(conc)))
            print("RATE %.1f" % (counts[0] / (time.monotonic() - t0)), flush=True)


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "serve":
        asyncio.run(serve())
    elif len(sys.argv) == 4 and sys.argv[1] == "client":
        asyncio.run(client(int(sys.argv[2]), float(sys.argv[3])))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

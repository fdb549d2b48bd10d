"""Peak RSS and time of `mixtral.load(CHECKPOINT, quantize=MODE)` in whichever mixtral is on sys.path:
`PYTHONPATH=<tree> python load_quantized_peak.py CHECKPOINT MODE LABEL`."""
import resource, sys, time, torch, mixtral
torch.set_num_threads(2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
m = mixtral.load(sys.argv[1], quantize=sys.argv[2], progress=False)
s = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(sys.argv[3], sys.argv[2], f"peak RSS {peak/2**20:.2f} GiB (start {before/2**20:.2f})", f"{s:.1f} s")

#!/usr/bin/env python3
"""sass-count.py: static instruction counts of a kernel's loops, for GPU code changed on a machine
without a GPU (a proxy for issue-bound kernels, never a timing).

    nvcc ... -lineinfo -cubin -arch=sm_90 -o x.cubin kvcodec/attend.cu
    nvdisasm -g -c x.cubin > x.sass
    scripts/sass-count.py x.sass attend_mma_kernelILi128ELi3ELb1E            # loops
    scripts/sass-count.py x.sass attend_mma_kernelILi128ELi3ELb1E 5919 7267  # its blocks

The first form lists every loop (a backward branch and its target) with an opcode histogram; the
second splits one index range into basic blocks, so that a path through a loop body can be
summed by hand (which blocks a path takes is read from the branches printed between them).
nvdisasm comes with the CUDA toolkit, or from the PyPI wheel nvidia-cuda-nvdisasm.
"""
import collections
import re
import sys


def load(path, name):
    lines = open(path).read().split('\n')
    starts = [i for i, l in enumerate(lines) if l.startswith('.text.') and name in l]
    if not starts:
        sys.exit(f'sass-count: no function matching {name!r} in {path}')
    start = starts[0]
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith('.text.')),
               len(lines))
    ins, labels = [], {}
    for l in lines[start:end]:
        m = re.match(r'^\.(L_x_\d+):', l)
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = re.match(r'\s*/\*([0-9a-f]{4,})\*/\s+(.*?);', l)
        if m:
            ins.append(m.group(2).strip())
    return ins, labels


def opcode(text):
    text = re.sub(r'^@!?U?P\w+\s+', '', text)  # predicate
    return text.split()[0].split('.')[0]


def histogram(body, top=16):
    c = collections.Counter(opcode(t) for t in body)
    return ' '.join(f'{k}:{v}' for k, v in c.most_common(top))


def main():
    if len(sys.argv) not in (3, 5):
        sys.exit(__doc__)
    ins, labels = load(sys.argv[1], sys.argv[2])
    if len(sys.argv) == 3:
        for i, t in enumerate(ins):
            m = re.search(r'BRA\s+`?\(?\.?(L_x_\d+)', t)
            if m and m.group(1) in labels and labels[m.group(1)] <= i:
                s = labels[m.group(1)]
                print(f'loop {s}-{i} n={i - s + 1}  {histogram(ins[s:i + 1])}')
        return
    lo, hi = int(sys.argv[3]), int(sys.argv[4])
    at = {v: k for k, v in labels.items()}
    block = lo
    for i in range(lo, hi + 1):
        if i in at and i > block:
            print(f'[{block}-{i - 1}] n={i - block}  {histogram(ins[block:i], 8)}')
            block = i
        if i in at:
            print(f'  {at[i]}:')
        if 'BRA' in ins[i] or 'EXIT' in ins[i]:
            print(f'[{block}-{i}] n={i - block + 1}  {histogram(ins[block:i + 1], 8)}')
            print(f'      {ins[i]}')
            block = i + 1
    if block <= hi:
        print(f'[{block}-{hi}] n={hi - block + 1}  {histogram(ins[block:hi + 1], 8)}')


if __name__ == '__main__':
    main()

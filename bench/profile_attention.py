"""One launch of the attention kernel on a benchmark shape, for Nsight Compute:

    ncu --section WarpStateStats --section SchedulerStats -k regex:attention_kernel -c 1 \\
        python bench/profile_attention.py [--batch 32 --tokens 32768] [--queries 1] [--keep-fraction 0.01]

(--queries above 16 runs the long-query kernel: -k regex:prefill_kernel.)
"""
import argparse

import torch

import vecinfer
from vecinfer.bench import vecinfer_inputs

parser = argparse.ArgumentParser()
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--tokens", type=int, default=32768)
parser.add_argument("--head-dim", type=int, default=128)
parser.add_argument("--queries", type=int, default=1)
parser.add_argument("--keep-fraction", type=float, default=0.0, help="tokens kept in full precision (read as sinks)")
args = parser.parse_args()
inp = vecinfer_inputs(args.batch, args.tokens, 32, 8, args.head_dim, args.queries, 2, 2,
                      keep_fraction=args.keep_fraction)
vecinfer.attention(**inp)
torch.cuda.synchronize()

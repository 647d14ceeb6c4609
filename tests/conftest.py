"""Test-suite settings: the models here are tiny, so one intra-op thread is faster (and far
less sensitive to other load on a 2-core machine) than torch's default thread pool."""
import torch

torch.set_num_threads(1)

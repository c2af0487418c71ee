"""Many processes: torchrun (`torchrun --nproc-per-node N cvlp.py ...`), one process per GPU, each training on
its share of every global batch so that the run equals one process's with the global batch. Without torchrun
none of this runs: rank_world() is (0, 1) and gather(t) is t. engine.fit calls agree() and stop_signal()."""
import os
import signal
import sys
import warnings

import torch


def init_distributed(args):
    """torchrun starts one process per GPU and sets RANK, WORLD_SIZE and LOCAL_RANK: join the process group
    (NCCL on CUDA, gloo on CPU) and put this process on cuda:LOCAL_RANK. Under plain `python` a no-op.
    Ranks other than 0 print nothing (their logs would repeat rank 0's); errors still reach stderr (fail)."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return
    if str(args.device).startswith("cuda"):
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    backend = "nccl" if str(args.device).startswith("cuda") else "gloo"
    store = attempt_store()
    if store is None:
        torch.distributed.init_process_group(backend)                # env://: MASTER_ADDR, MASTER_PORT
    else:
        torch.distributed.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                             world_size=int(os.environ["WORLD_SIZE"]))
    if torch.distributed.get_rank() != 0:
        import builtins
        builtins.print = lambda *a, **k: None
    if (store is None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0):
        print("warning: torchrun --max-restarts on several machines: start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, "
              "so that a restarted run's ranks find each other (else they may try the killed ranks' addresses)",
              file=sys.stderr)


def attempt_store():
    """torchrun on one machine: the key-value store the ranks meet in, private to this attempt; otherwise None
    (init_process_group opens the one in MASTER_ADDR:MASTER_PORT). torchrun's agent keeps one store for all
    attempts of a run (TORCHELASTIC_USE_AGENT_STORE), so after a restart a rank can read the address that a
    killed rank of the last attempt left there and fail to connect (pytorch/pytorch#135712); a prefix per
    attempt keeps the attempts apart. TORCHELASTIC_RESTART_COUNT is the same for every rank of one machine,
    not always across machines: there TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives each attempt a new store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1:
        return None
    from torch.distributed.constants import default_pg_timeout
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                       timeout=default_pg_timeout)      # the agent serves it; every rank a client
    return torch.distributed.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def rank_world():
    """(this process's rank, number of processes): (0, 1) without torchrun."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def distribute(module, args):
    """torchrun: `module` wrapped in DistributedDataParallel, which averages the gradients over the ranks
    during backward (call the wrapper, not the module, so it knows a backward follows). BatchNorm (RN50)
    becomes SyncBatchNorm on CUDA, so batch statistics span the global batch as in one process.
    Buffers are not re-broadcast each step: they are equal on all ranks (LGR's anchors are large)."""
    if str(args.device).startswith("cuda"):
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    device_ids = [torch.device(args.device).index] if str(args.device).startswith("cuda") else None
    with warnings.catch_warnings():          # torch 2.14 renames broadcast_buffers; requirements.txt: torch >= 2.2
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


def gather(t):
    """torchrun: the (N * B, ...) concatenation in rank order of every rank's (B, ...) tensor t, with
    gradients flowing back to each rank's share; one process: t itself. Backward sums the gradients that
    all ranks send to a share (the reduce-scatter of all_gather's backward)."""
    if not torch.distributed.is_initialized():
        return t
    if not t.requires_grad:
        parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, t.contiguous())
        return torch.cat(parts)
    with warnings.catch_warnings():          # torch 2.14 deprecates it for a private API; the same autograd gather
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(torch.distributed.nn.functional.all_gather(t))


def agree(loss, received):
    """torchrun: (the mean of the ranks' losses, the signal to stop on: SIGTERM if any rank has had one so far,
    else SIGINT if any has had a Ctrl-C, else None), in one all_reduce. Equal shares of the global batch make the
    mean the global batch's loss. Every rank then takes the same branch (stop on a non-finite loss; save and
    stop, with the same exit status), so none is left waiting in a collective."""
    flags = [float(signal.SIGINT in received), float(signal.SIGTERM in received)]
    t = torch.cat([loss.detach().float().reshape(1), torch.tensor(flags, device=loss.device)])   # (3,)
    torch.distributed.all_reduce(t)
    value, ctrl_c, term = t.tolist()
    return value / rank_world()[1], stop_signal([signal.SIGINT] * (ctrl_c > 0) + [signal.SIGTERM] * (term > 0))


def stop_signal(received):
    """The signal a run stops on: SIGTERM if one came (the scheduler's kill follows it), else SIGINT, else None."""
    if signal.SIGTERM in received:
        return signal.SIGTERM
    return signal.SIGINT if received else None

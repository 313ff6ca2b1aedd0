"""BT RNN outputs that cross a process boundary (a torch.multiprocessing queue, a DataLoader worker) keep their
values while the producer goes on training: no memory the library lets go of is handed out again while another
process can still see it."""
import pytest
import torch
import torch.multiprocessing as mp
from rnn_helpers import BTLSTMDataset, produce_btlstm_outputs

STEPS = 3


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_btlstm_outputs_sent_through_a_queue_stay_unchanged(seed, method):
    context = mp.get_context(method)
    queue, trained, done = context.Queue(), context.Event(), context.Event()
    producer = context.Process(target=produce_btlstm_outputs, args=(queue, trained, done, seed, STEPS))
    producer.start()
    try:
        received = [queue.get(timeout=120) for _ in range(STEPS)]
        assert trained.wait(120), "the producer did not finish its later steps"
        for k, (output, copy) in enumerate(received):
            assert torch.equal(output, copy), f"output {k} changed during the producer's later steps"
    finally:
        done.set()
        producer.join(60)
        if producer.is_alive():
            producer.kill()
    assert producer.exitcode == 0


def test_btlstm_outputs_made_in_a_dataloader_worker_stay_unchanged(seed):
    loader = torch.utils.data.DataLoader(BTLSTMDataset(seed, 6), batch_size=None, num_workers=1)
    received = list(loader)  # the worker made every later output before the last one arrived
    assert len(received) == 6
    for k, (output, copy) in enumerate(received):
        assert torch.equal(output, copy), f"output {k} changed during the worker's later steps"

"""A newcomer that cannot even get its batch (its adapter's slot acquisition fails) ends alone as
``Row.failed``: an error completion with no tokens; the requests beside it are served as alone."""

from serve_fixtures import make_engine, write_adapters

from minift.serve import Request, Scheduler
from minift.serve.slots import AdapterSlots


def test_a_newcomer_whose_slot_cannot_be_acquired_fails_alone(tmp_path, monkeypatch):
    engine = make_engine(write_adapters(tmp_path, names=["r1", "r3"]))
    good = [Request([1, 2, 3], "r1", 4), Request([4], None, 3)]
    alone = [engine.generate([r])[0].tokens for r in good]
    acquire = AdapterSlots.acquire

    def refuse_r3(self, names, *args, **kwargs):
        if "r3" in names:
            raise ValueError("no slot for r3")
        return acquire(self, names, *args, **kwargs)

    monkeypatch.setattr(AdapterSlots, "acquire", refuse_r3)
    bad = Request([5, 6], "r3", 4)
    scheduler = Scheduler(engine)
    for request in (good[0], bad, good[1]):  # all three join in one prefill, which is then split
        scheduler.add(request)
    done = {}
    while scheduler.busy:
        done.update({id(r): c for r, c in scheduler.step()})
    assert [done[id(r)].tokens for r in good] == alone
    failed = done[id(bad)]
    assert (failed.finish_reason, failed.tokens, failed.prompt_tokens) == ("error", [], 2)
    assert failed.error == "the prefill failed: ValueError: no slot for r3"

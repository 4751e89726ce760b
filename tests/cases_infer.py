"""Rank-side: save stock checkpoints (tests.ckpt_fixtures) for the launcher's regression matrix."""


def save_all(specs, tp: int):
    """specs: [(format, family, directory)]; returns each stock model's reference output."""
    from tests.ckpt_fixtures import make_checkpoint

    return [make_checkpoint(fmt, family, tp, directory) for fmt, family, directory in specs]

"""Full disk and spent quota as one line (fitscale.diskspace): a quota is named as a quota.

A real EDQUOT needs a filesystem with quotas turned on, which a test machine rarely has; the
errors here are the ones the kernel (OSError errno 122) and safetensors (`(os error 122)` in a Rust
error's message) raise, raised inside the same block a write runs in.
"""

from __future__ import annotations

import errno
import os

import pytest

from fitscale.diskspace import OutOfSpaceError, describe, named_out_of_space


class RustError(Exception):
    """The shape of safetensors' SafetensorError: the errno only in the message."""


def quota_errors(path):
    yield OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(path))
    yield RustError("Error while serializing: I/O error: Disk quota exceeded (os error 122)")


@pytest.mark.parametrize("index", [0, 1])
def test_a_spent_quota_is_named_as_a_quota_not_a_full_filesystem(tmp_path, index):
    """Was `no space left on the filesystem of ... (… GiB free)`: with the filesystem's free bytes
    in view, a user looks for a full disk that is not there."""
    target = tmp_path / "out.bin"
    error = list(quota_errors(target))[index]
    with pytest.raises(OutOfSpaceError) as caught:
        with named_out_of_space(target, "the weights file", "Write the file elsewhere", needed=2048):
            raise error
    message = str(caught.value)
    assert message.startswith(
        f"disk quota exceeded on the filesystem of {target} for the weights file (it needs about 2.0 KiB, "
        "the filesystem has "
    ), message
    assert message.endswith(
        "free space you own there, ask for a larger quota, or write the file elsewhere"
    ), message
    assert "no space left" not in message and "\n" not in message


def test_a_full_filesystem_is_still_no_space_left(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(
        OutOfSpaceError, match=r"^no space left on the filesystem of .*out.bin for x \(.* free\); fix$"
    ):
        with named_out_of_space(target, "x", "fix"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
    unnamed = describe(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(target)))
    assert str(unnamed).startswith(f"disk quota exceeded on the filesystem of {target} for this write")

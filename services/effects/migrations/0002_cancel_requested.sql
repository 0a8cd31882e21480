-- A user's cancel is recorded before RunningHub is asked to cancel: RunningHub then
-- reports the task as FAILED (interrupted), and whichever path learns that first (a
-- poll's refresh, the callback, the sweeper) records it as CANCELLED, not FAILED.
-- Cleared again when RunningHub refused or could not be reached.
ALTER TABLE tasks ADD COLUMN cancel_requested_at timestamptz;

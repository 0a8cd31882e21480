-- The sum of metric values per rollup bucket becomes exact (issue 7): a
-- double precision sum overflowed to infinity (two values near 1.7e308) and
-- drifted when a re-report moved a value out and back in. numeric adds the
-- values exactly (each converted from float8 the same way every time), so
-- moving a value back restores the sum to the digit, and it cannot overflow.
ALTER TABLE rollup_metrics ALTER COLUMN sum TYPE numeric USING sum::numeric;

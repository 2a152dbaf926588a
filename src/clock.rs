//! Wall time as Unix milliseconds, the unit of CES timestamps and of the Lease's cycle-start record: the
//! one place that reads the system clock for them.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch now (0 for a clock before 1970).
pub fn now_ms() -> i64 {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    i64::try_from(ms).unwrap_or(i64::MAX)
}

//! How errors are classified across feedloop: whose fault it is, and whether retrying helps.

/// Whose fault an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The input is wrong; retrying the same input fails the same way.
    BadInput,
    /// A dependency (broker, database, registry) is down or slow; retrying may help.
    Unavailable,
    /// An invariant broke; a bug to report.
    Internal,
}

/// Implemented by every crate's error type.
pub trait Classify {
    fn class(&self) -> ErrorClass;

    fn retryable(&self) -> bool {
        self.class() == ErrorClass::Unavailable
    }
}

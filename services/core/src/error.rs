//! How errors are classified across feedloop: whose fault it is, and whether retrying helps.
//! The one place that says which broker and database errors are permanent; consumers and
//! producers decide between retrying, pausing and dead-lettering from [`Classify`] alone.

/// Whose fault an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The input is wrong; retrying the same input fails the same way.
    BadInput,
    /// A dependency (broker, database, registry) is down or slow; retrying may help.
    Unavailable,
    /// An invariant broke, or the dependency answered with an error that is neither of the
    /// above; retrying a bounded number of times may help.
    Internal,
}

/// Implemented by every crate's error type.
pub trait Classify {
    fn class(&self) -> ErrorClass;

    fn retryable(&self) -> bool {
        self.class() == ErrorClass::Unavailable
    }
}

/// Broker errors about the record itself (its size, its format, its topic's name) are
/// [`ErrorClass::BadInput`]: sending it again fails the same way.
#[cfg(feature = "kafka")]
impl Classify for rdkafka::error::KafkaError {
    fn class(&self) -> ErrorClass {
        use rdkafka::{error::KafkaError, types::RDKafkaErrorCode as C};
        if let KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) = self {
            return ErrorClass::Internal;
        }
        match self.rdkafka_error_code() {
            Some(
                C::MessageSizeTooLarge
                | C::MessageBatchTooLarge
                | C::InvalidMessageSize
                | C::InvalidMessage
                | C::InvalidRecord
                | C::BadMessage
                | C::InvalidTopic
                | C::UnsupportedForMessageFormat
                | C::PolicyViolation,
            ) => ErrorClass::BadInput,
            Some(C::Fatal | C::InvalidArgument) => ErrorClass::Internal,
            _ => ErrorClass::Unavailable,
        }
    }
}

/// A database that cannot be reached, or says it cannot serve now (SQLSTATE classes 08, 53,
/// 57P0x), is [`ErrorClass::Unavailable`]; data the database refuses (classes 22 and 23: a
/// NUL in a text, a value out of range, a constraint) is [`ErrorClass::BadInput`]; the rest
/// (serialization failures, deadlocks, bugs) is [`ErrorClass::Internal`].
impl Classify for sqlx::Error {
    fn class(&self) -> ErrorClass {
        match self {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_) => ErrorClass::Unavailable,
            sqlx::Error::Encode(_) => ErrorClass::BadInput,
            sqlx::Error::Database(e) => {
                let code = e.code().unwrap_or_default();
                if code.starts_with("08") || code.starts_with("53") || code.starts_with("57P") {
                    ErrorClass::Unavailable
                } else if code.starts_with("22") || code.starts_with("23") {
                    ErrorClass::BadInput
                } else {
                    ErrorClass::Internal
                }
            }
            _ => ErrorClass::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "kafka")]
    #[test]
    fn broker_refusals_of_the_record_are_bad_input_and_outages_are_not() {
        use rdkafka::{error::KafkaError, types::RDKafkaErrorCode as C};
        let produce = |c| KafkaError::MessageProduction(c);
        assert_eq!(
            produce(C::MessageSizeTooLarge).class(),
            ErrorClass::BadInput
        );
        assert_eq!(produce(C::InvalidRecord).class(), ErrorClass::BadInput);
        assert_eq!(produce(C::MessageTimedOut).class(), ErrorClass::Unavailable);
        assert_eq!(produce(C::AllBrokersDown).class(), ErrorClass::Unavailable);
        assert_eq!(
            produce(C::NotLeaderForPartition).class(),
            ErrorClass::Unavailable
        );
        assert!(produce(C::QueueFull).retryable());
    }

    #[test]
    fn database_outages_are_unavailable() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(io.class(), ErrorClass::Unavailable);
        assert_eq!(sqlx::Error::PoolTimedOut.class(), ErrorClass::Unavailable);
        assert_eq!(sqlx::Error::RowNotFound.class(), ErrorClass::Internal);
    }
}

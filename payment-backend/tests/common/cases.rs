//! Running one test case on every database: `per_database!` and
//! [`Backend::start`] with the default options.

use super::backend::{Backend, Db, Options};

/// One module per store, each with a test per case that runs
/// `super::case(db)`: `per_database!([sqlite => Db::Sqlite, …] (case, …));`
#[macro_export]
macro_rules! per_database {
    ([$($module:ident => $db:expr),* $(,)?] $cases:tt) => {
        $( $crate::per_database!(@one $module => $db; $cases); )*
    };
    (@one $module:ident => $db:expr; ($($case:ident),* $(,)?)) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case($db).await;
                }
            )*
        }
    };
}

// === impl Backend ===

impl Backend {
    /// Starts a backend on `db` with the default [`Options`].
    pub(crate) async fn start(db: Db) -> Backend {
        Self::start_with(db, Options::default()).await
    }
}

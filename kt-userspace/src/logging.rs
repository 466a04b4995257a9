//! Logs: `tracing`, filtered by KT_LOG (or -v/-vv), written as kt-connect writes its lines:
//! `12:04:05 INF message key=value`.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

struct KtFormat;

impl<S, N> FormatEvent<S, N> for KtFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let now = k8s_openapi::jiff::Zoned::now();
        let lvl = match *event.metadata().level() {
            Level::ERROR => "ERR",
            Level::WARN => "WRN",
            Level::INFO => "INF",
            Level::DEBUG => "DBG",
            Level::TRACE => "TRC",
        };
        write!(w, "{} {lvl} ", now.strftime("%H:%M:%S"))?;
        ctx.field_format().format_fields(w.by_ref(), event)?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                if let Some(f) = span.extensions().get::<FormattedFields<N>>()
                    && !f.is_empty()
                {
                    write!(w, " {}", f)?;
                }
            }
        }
        writeln!(w)
    }
}

/// Installs the subscriber: KT_LOG wins; else info for ktctl (debug with -v, trace with -vv)
/// and warnings from libraries.
pub fn init(verbose: u8) {
    let default = match verbose {
        0 => "warn,ktctl=info,kt_common=info",
        1 => "info,ktctl=debug,kt_common=debug,aya=info",
        _ => "debug,ktctl=trace,kt_common=trace",
    };
    let filter = EnvFilter::try_from_env("KT_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .event_format(KtFormat)
        .try_init();
}

//! Error chains as text.

/// An error and its causes, outermost first, as one line: logged once, where the
/// 5xx answer is made, and printed by the CLI.
pub fn cause_chain(e: &dyn std::error::Error) -> String {
    let mut chain = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        chain.push_str(": ");
        chain.push_str(&cause.to_string());
        source = cause.source();
    }
    chain
}

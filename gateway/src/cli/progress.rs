//! The CLI's progress bar while a model's weights load (the engine reports
//! progress through its `LoadProgress` trait and draws nothing itself).

/// A progress bar on stderr while weights load (hidden when stderr is no terminal).
pub(crate) struct ProgressBar(indicatif::ProgressBar);

impl ProgressBar {
    pub(crate) fn new(what: &str) -> ProgressBar {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} layers")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(format!("loading {what}"));
        ProgressBar(bar)
    }
}

impl ferry_engine::model::weights::LoadProgress for ProgressBar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
    }
    fn advance(&self, n: u64) {
        self.0.inc(n);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

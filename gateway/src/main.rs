fn main() {
    ferry::run_cli();
}

// k6 provides console in every context (https://grafana.com/docs/k6/latest/javascript-api/#console);
// @types/k6 2.3.0 does not declare it and lib "dom" would declare far more than k6 has.
declare var console: {
  log(...data: unknown[]): void;
  info(...data: unknown[]): void;
  warn(...data: unknown[]): void;
  error(...data: unknown[]): void;
  debug(...data: unknown[]): void;
};

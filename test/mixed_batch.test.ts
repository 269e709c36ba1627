import { mixedBatchSuite } from "./helpers/suites.js";

mixedBatchSuite("cpu");

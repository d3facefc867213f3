#include "runtime/base/trace.h"

#include <set>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "runtime/base/file_util.h"
#include "runtime/base/json_writer.h"

namespace ecss {
namespace {

TEST(JsonWriterTest, NestedDocumentParses) {
  JsonWriter json;
  json.BeginObject()
      .Field("suite", "device")
      .Field("count", 3)
      .Field("ratio", 0.25)
      .Field("ok", true)
      .Field("nan", std::numeric_limits<double>::quiet_NaN())
      .Key("sizes")
      .BeginArray()
      .Int(1)
      .Int(-2)
      .Uint(18446744073709551615ull)
      .EndArray()
      .Key("empty")
      .BeginObject()
      .EndObject()
      .Field("text", "quote \" backslash \\ newline \n tab \t bell \x07")
      .EndObject();
  ASSERT_TRUE(json.complete());
  nlohmann::json parsed = nlohmann::json::parse(json.str());
  EXPECT_EQ(parsed["suite"], "device");
  EXPECT_EQ(parsed["count"], 3);
  EXPECT_DOUBLE_EQ(parsed["ratio"].get<double>(), 0.25);
  EXPECT_TRUE(parsed["nan"].is_null());
  EXPECT_EQ(parsed["sizes"][2].get<uint64_t>(), 18446744073709551615ull);
  EXPECT_EQ(parsed["text"], "quote \" backslash \\ newline \n tab \t bell \x07");
  EXPECT_TRUE(parsed["empty"].is_object());
}

TEST(JsonWriterTest, DoublesRoundTripExactly) {
  for (double value : {0.1, 1.0 / 3.0, 6.02214076e23, -1e-300, 123456789.125}) {
    JsonWriter json;
    json.BeginArray().Double(value).EndArray();
    EXPECT_EQ(nlohmann::json::parse(json.str())[0].get<double>(), value);
  }
}

TEST(TraceRecorderTest, ManyThreadsProduceValidChromeTrace) {
  TraceRecorder trace("test-process");
  const int h2d = trace.Lane("H2D");
  EXPECT_EQ(trace.Lane("H2D"), h2d);  // stable ids
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&trace, t] {
      const int lane = trace.Lane("stream:" + std::to_string(t));
      for (int i = 0; i < 100; ++i) {
        TraceScope scope(&trace, lane, "copy \"expert\" " + std::to_string(i), "copy",
                         {{"bytes", 4096.0 * i}});
      }
      trace.Instant(lane, "done", "marker", TraceRecorder::Clock::now());
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(trace.event_count(), 4u * 101u);

  nlohmann::json parsed = nlohmann::json::parse(trace.ToJson());
  ASSERT_TRUE(parsed["traceEvents"].is_array());
  std::set<std::string> lane_names;
  int complete = 0;
  for (const auto& event : parsed["traceEvents"]) {
    ASSERT_TRUE(event.contains("ph"));
    ASSERT_TRUE(event.contains("pid"));
    ASSERT_TRUE(event.contains("tid"));
    if (event["ph"] == "M" && event["name"] == "thread_name") {
      lane_names.insert(event["args"]["name"].get<std::string>());
    }
    if (event["ph"] == "X") {
      ++complete;
      EXPECT_GE(event["dur"].get<double>(), 0.0);
      EXPECT_GE(event["ts"].get<double>(), 0.0);
      EXPECT_TRUE(event["args"].contains("bytes"));
    }
  }
  EXPECT_EQ(complete, 400);
  EXPECT_EQ(lane_names,
            (std::set<std::string>{"H2D", "stream:0", "stream:1", "stream:2", "stream:3"}));
}

TEST(TraceRecorderTest, NullRecorderScopeIsFree) {
  TraceScope scope(nullptr, 0, "nothing", "none");  // must not crash or record
}

TEST(TraceRecorderTest, WriteJsonAtomicallyAndReportsBadPaths) {
  TraceRecorder trace;
  trace.Complete(trace.Lane("compute"), "ffn", "kernel", TraceRecorder::Clock::now(),
                 TraceRecorder::Clock::now());
  const std::string path = ::testing::TempDir() + "/ecss_trace_test.json";
  ASSERT_TRUE(trace.WriteJson(path).ok());
  StatusOr<std::string> contents = ReadFileToString(path);
  ASSERT_TRUE(contents.ok());
  EXPECT_EQ(nlohmann::json::parse(*contents)["traceEvents"].size(), 4u);  // 1 + 2 meta + 1

  Status missing = trace.WriteJson("/nonexistent-dir/trace.json");
  EXPECT_EQ(missing.code(), StatusCode::kNotFound);
  EXPECT_NE(missing.message().find("/nonexistent-dir/trace.json"), std::string_view::npos);
  EXPECT_EQ(ReadFileToString("/nonexistent-dir/x").status().code(), StatusCode::kNotFound);
}

}  // namespace
}  // namespace ecss

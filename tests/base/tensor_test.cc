#include "runtime/base/tensor.h"

#include <gtest/gtest.h>

#include "runtime/base/memory_tag.h"

namespace ecss {
namespace {

TEST(ShapeTest, ElementsAndText) {
  Shape shape{512, 1024};
  EXPECT_EQ(shape.rank(), 2);
  EXPECT_EQ(shape[1], 1024);
  EXPECT_EQ(shape.num_elements(), 512 * 1024);
  EXPECT_EQ(shape.ToString(), "[512, 1024]");
  EXPECT_EQ(Shape{}.num_elements(), 1);
  EXPECT_EQ((Shape{3, 0, 2}).num_elements(), 0);
  EXPECT_EQ(shape, (Shape{512, 1024}));
  EXPECT_NE(shape, (Shape{512}));
}

TEST(ShapeTest, MakeRejectsBadInput) {
  const int64_t negative[] = {4, -1};
  StatusOr<Shape> bad = Shape::Make(negative, 2);
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("extent 1"), std::string_view::npos);
  const int64_t dims[7] = {1, 1, 1, 1, 1, 1, 1};
  EXPECT_EQ(Shape::Make(dims, 7).status().code(), StatusCode::kInvalidArgument);
  StatusOr<Shape> good = Shape::Make(dims, 3);
  ASSERT_TRUE(good.ok());
  EXPECT_EQ(good->rank(), 3);
}

TEST(TensorViewTest, MakeAndDescribe) {
  float data[6] = {};
  StatusOr<TensorView> view = TensorView::Make(data, DType::kF32, Shape{2, 3}, Device::Host());
  ASSERT_TRUE(view.ok());
  EXPECT_EQ(view->bytes(), 24u);
  EXPECT_EQ(view->data_as<float>(), data);
  EXPECT_EQ(view->ToString(), "f32[2, 3]@host");
  EXPECT_EQ(TensorView::Make(nullptr, DType::kBF16, Shape{2}, Device::Sim()).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_TRUE(TensorView::Make(nullptr, DType::kBF16, Shape{0}, Device::Sim()).ok());
  EXPECT_EQ(Device::Cuda(1).ToString(), "cuda:1");
  EXPECT_EQ(Device::Sim().ToString(), "sim:0");
}

TEST(MemoryTagTest, NamesRoundTrip) {
  for (int i = 0; i < kNumMemoryTags; ++i) {
    const auto tag = static_cast<MemoryTag>(i);
    StatusOr<MemoryTag> parsed = ParseMemoryTag(MemoryTagName(tag));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, tag);
  }
  EXPECT_EQ(ParseMemoryTag("weights").status().code(), StatusCode::kInvalidArgument);
}

TEST(MemoryAccountingTest, ChargeReleasePeak) {
  MemoryAccounting accounting;
  accounting.Charge(MemoryTag::kExpertWeights, 100);
  accounting.Charge(MemoryTag::kExpertWeights, 50);
  accounting.Charge(MemoryTag::kStaging, 10);
  accounting.Release(MemoryTag::kExpertWeights, 100);
  MemoryUsage weights = accounting.Usage(MemoryTag::kExpertWeights);
  EXPECT_EQ(weights.bytes, 50u);
  EXPECT_EQ(weights.peak_bytes, 150u);
  EXPECT_EQ(weights.allocations, 1u);
  EXPECT_EQ(accounting.Total().bytes, 60u);
  EXPECT_EQ(accounting.Total().peak_bytes, 160u);
  EXPECT_EQ(accounting.Usage(MemoryTag::kGradients).bytes, 0u);
  const std::string summary = accounting.Summary();
  EXPECT_NE(summary.find("expert_weights"), std::string::npos);
  EXPECT_NE(summary.find("staging"), std::string::npos);
  EXPECT_EQ(summary.find("gradients"), std::string::npos);
}

TEST(MemoryAccountingDeathTest, ReleasingMoreThanChargedAborts) {
  MemoryAccounting accounting;
  accounting.Charge(MemoryTag::kWorkspace, 8);
  EXPECT_DEATH(accounting.Release(MemoryTag::kWorkspace, 16), "only 8 are charged");
}

}  // namespace
}  // namespace ecss
